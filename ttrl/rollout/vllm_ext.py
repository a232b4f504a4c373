"""Code that runs inside vLLM's worker processes (loaded by `worker_extension_cls`).

vLLM instantiates its workers itself; this mixin adds the methods the
rollout actor reaches through `llm.collective_rpc`. Bytes in, in-place
reload out. The method must not be called `update_weights`: vLLM's workers
already have one. Validation happens in the rollout actor before this runs.
"""

from __future__ import annotations


class TTRLWorkerExtension:
    def ttrl_load_weights(self, blobs: list[bytes]) -> int:
        """Load a full set of weights (several packed buckets) in place."""
        from ttrl.rollout.weights import unpack

        def named():
            for blob in blobs:
                yield from unpack(blob).items()

        # reload_weights re-materialises every layer: it needs all weights in
        # one call (a partial set would leave the rest as meta tensors).
        self.model_runner.reload_weights(weights_iterator=named())
        return len(blobs)
