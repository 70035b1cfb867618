"""The service layer at the orchestration level: what callers may ask for (``requests``, Pydantic only), the
native request in the generation service's form (``native``), the OpenAI
compatibility (``openai``: messages to prompt, results to responses and stream chunks; ``openai_types``:
OpenAI's response shapes) and the Batch API's line planner and executor (``batch_lines``). Used by the HTTP
routes and by the workers alike; imports nothing from ``textgen.api``."""
