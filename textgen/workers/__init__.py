"""The workers: everything that runs in the background on the stores (``textgen.jobs``, ``textgen.batches``).

- ``loop``: the one leased poll loop (stop flag, wake-up, poll interval, store conditions, lease renewal);
- ``runner``: the job runner, one per process, on the generation service;
- ``coordinator``: the batch coordinator, moving each batch through its statuses one leased step at a time;
- ``webhooks``: job and batch webhook delivery through the one sender (``textgen.webhooks``);
- ``batches``: the Batch API's run-time parts started together.
"""
