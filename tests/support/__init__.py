"""Helpers every test layer imports (no layer imports another layer's conftest or test modules):

* ``app`` - the app in-process on the tiny model (settings, lifespan + client);
* ``server`` - real ``uvicorn main:app`` subprocesses and the job helpers that talk to them;
* ``tiny_model`` - a tiny GPT-2 and its tokenizer, saved to disk;
* ``redis`` - a real redis-server on a free port;
* ``webhooks`` - a real webhook receiver;
* ``net`` - free ports; ``waiting`` - ``wait_until`` / ``wait_until_sync``, the only way tests wait;
* ``batch_files``, ``structured``, ``constraint_attacks`` - shared test data builders.
"""
