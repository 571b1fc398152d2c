"""The GPU pool: the service's jobs run on the replicas of a Ray Serve deployment (``serve --pool ray``).

The service front is unchanged (backend/service/server.py: endpoint, protocol, CURVE, limits, the fair
JobQueue); only the one worker thread is replaced by a dispatcher that keeps one job in flight per
replica. Modules, one job each:

- ``plan``: how many replicas, with which resources (pure; checks the settings).
- ``replica``: the Ray Serve deployment; each replica loads the engine once and streams a job's events.
- ``transfer``: pixels into Ray's object store once, read back zero-copy.
- ``dispatcher``: the slot threads that take fair jobs, call the deployment and forward events.
- ``capabilities``: what ``welcome`` says about the pool, and the engine stand-in the service reads.
- ``cluster``: start or join Ray, deploy, tear down.

Everything here but ``plan`` and ``capabilities`` imports Ray: install ``krita-sdxl[pool]``.
"""
