"""Storage plumbing shared by the job store and the rate limiter: the parsed ``TEXTGEN_JOB_STORE`` URL
(``url``), one SQLite connection helper (``sqlite``) and one Redis client helper with the outage guard
and the durability check (``redis``). Nothing here knows about jobs or limits; ``textgen.backends``
builds both from one parsed URL.
"""
