"""The HTTP API's request and response schemas, one module per surface: ``native`` (``/generate``,
``/jobs``, probes, errors), ``openai`` (``/v1`` completions and chat) and ``batch`` (``/v1/files``,
``/v1/batches``). Routes import from these modules; the top-level ``models.py`` re-exports them all."""
