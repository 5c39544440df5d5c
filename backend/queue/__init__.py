"""From a Label Studio webhook to a training job on RQ.

- :mod:`.contract` — the jobs the backend enqueues (by dotted name), their queues and options;
- :mod:`.webhook` — Label Studio's webhook payloads, parsed once into typed events + review jobs;
- :mod:`.eventlog` — the per-project event log in Redis (append, read, fold, trim);
- :mod:`.debounce` — the trigger policy: one pending training job per project, its due time;
- :mod:`.spool` — the disk spool that keeps events while Redis is away.
"""
