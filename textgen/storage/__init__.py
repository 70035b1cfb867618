"""Storage plumbing shared by the job store and the rate limiter.

- ``url``: the parsed ``TEXTGEN_JOB_STORE`` URL (which backend, and where), decided once;
- ``sqlite``: one SQLite connection helper (WAL, busy timeout, ``BEGIN IMMEDIATE``);
- ``redis``: one Redis client helper with the outage guard and the durability (AOF) check;
- ``conditions``: errors of the environment (disk full, read-only file, database locked, Redis out of
  memory) mapped to one clear client error, logged once per change.

Nothing here knows about jobs or limits; ``textgen.backends`` builds both from one parsed URL.
"""
