"""Hooks that run inside a Serve LLM replica before its vLLM engine starts.

``ray.serve.llm`` starts every replica by sending a Ray task to each node of the replica's
placement group to "download" the weights, even when the source is a folder already on disk.
That task runs in a fresh worker that imports vLLM and torch: about 45 s of a 2-core machine's
start-up for nothing. :class:`LocalWeights` skips the step when the folder is present; sources that
are not local folders (Hugging Face ids, cloud mirrors) keep Ray's download.

The replica imports this module by name (``LLMConfig.callback_config``); nothing else should.
"""

from __future__ import annotations

import asyncio
import os

from ray.llm._internal.common.callbacks.base import CallbackBase


class LocalWeights(CallbackBase):
    """Skip Ray Serve LLM's per-node model download for weights already in a local folder."""

    async def on_before_node_init(self) -> None:
        source = getattr(self.llm_config.model_loading_config, "model_source", None)
        if isinstance(source, str) and await asyncio.to_thread(os.path.isdir, source):
            self.ctx.run_init_node = False
