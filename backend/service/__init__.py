"""The ZeroMQ service: the ROUTER server (``server``) on its I/O thread, the fair job queue and budgets (``jobs``,
``limits``, ``deliveries``), who a message comes from (``sessions``, ``peers``), who may connect (``security``,
``authorized``) and the worker thread that runs jobs on an engine (``worker``).

May use the engine (its request type), the models (out-of-memory handling), the setup's version, the common
foundations and the protocol; never the pool or the CLI."""
