"""Storage plumbing shared by the job store, the batch store and the rate limiter.

- ``url``: the parsed ``TEXTGEN_JOB_STORE`` URL (which backend, and where), decided once;
- ``sqlite``: one SQLite connection helper (WAL, busy timeout, ``BEGIN IMMEDIATE``);
- ``redis``: one Redis client helper with the outage guard and the durability (AOF) check;
- ``conditions``: errors of the environment (disk full, read-only file, database locked, Redis out of
  memory) mapped to one clear client error, logged once per change;
- ``migrations``: the SQLite schema versions (one per store) and their ordered migrations;
- ``lua``: Lua scripts read once from the ``.lua`` files beside the store that runs them.

Nothing here knows about jobs, batches or limits; ``textgen.backends`` builds all three from one parsed URL.
"""
