"""The ``openweight`` command, the one place that knows every part of the project.

- :mod:`router`   the OpenAI-compatible router (``openweight router``, ``openweight check-config``)
- :mod:`cluster`  the Ray Serve + vLLM side (``openweight run``, ``cluster ...``, ``model prepare``)
- :mod:`bench`    the benchmarks (``openweight bench <suite>``), where installed

``router`` imports neither ``cluster`` nor ``bench``, and ``cluster`` imports only the router's
settings, so the commands of each are put together here (:mod:`openweight.cli`).
"""
