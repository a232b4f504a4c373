"""Code that runs inside vLLM's worker processes (loaded by `worker_extension_cls`).

vLLM instantiates its workers itself; this mixin adds the methods the
rollout actor reaches through `llm.collective_rpc`. Two ways in:

- Ray path: the trainer's weight buckets, read in place from the object store
  (or a served version's packed bytes), one whole-model `reload_weights` out.
- Colocated path (`ipc.py`): the trainer rank on this device hands over
  each bucket by handle (CUDA IPC, or a shared file on CPU); the buckets
  stream into vLLM's layerwise reload one call at a time, between a begin and
  an end call.
- GPU path: every worker (each TP rank of each engine) joins the trainer's
  NCCL weight group once, then each step receives the planned buckets by
  broadcast and streams them into vLLM's layerwise reload: each layer is
  rebuilt as soon as all its tensors are in, so nothing near a second copy of
  the model is ever held.

Methods must not be called `update_weights` or `*_weight_update`: vLLM's
workers already have those. Validation (names, shapes, dtypes) happens in the
rollout actor before any of this runs; this code must never leave the model
half-reloaded: whatever happens during a round, every bucket is still
received (the sender would hang in NCCL otherwise) and the layerwise reload
is always finalized (otherwise layers stay on the meta device and the engine
is dead).
"""

from __future__ import annotations

import time


class TTRLWorkerExtension:
    # ── CPU/Ray path ──────────────────────────────────────────────────────
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

    def ttrl_load_store_weights(self, buckets: list, plan_wire: list[dict]) -> int:
        """Load a full set of weights from `nccl_sync.iter_store_buckets`'s buckets in place.

        `buckets` (lists of numpy arrays) alias the object store (read-only): the reload copies out of
        them into the model's own tensors and writes nothing back.
        """
        from ttrl.rollout.nccl_sync import plan_from_wire, store_named

        self.model_runner.reload_weights(weights_iterator=store_named(buckets, plan_from_wire(plan_wire)))
        return len(buckets)

    def _ttrl_after_reload(self) -> None:
        """What GPUModelRunner.reload_weights resets after a reload: state derived from the old weights."""
        self.model_runner.reset_lora_state()
        self.model_runner.reset_encoder_cache()
        self.model_runner.reset_mm_cache()

    # ── colocated path: buckets by handle (ipc.py) ────────────────────────
    def ttrl_shared_begin(self, plan_wire: list[dict]) -> int:
        """Start a round: every layer goes to the meta device until its tensors arrive (layerwise reload)."""
        import torch
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        from ttrl.rollout.nccl_sync import plan_from_wire

        plan = plan_from_wire(plan_wire)
        if getattr(self, "_ttrl_shared", None) is not None:
            # An abandoned round (its sender gave up before ending it): put the model back
            # together first. Its error is that round's, already reported on the sender's side.
            try:
                self.ttrl_shared_end()
            except RuntimeError:
                pass
        with set_current_vllm_config(self.vllm_config), torch.no_grad():
            initialize_layerwise_reload(self.model_runner.get_model())
        self._ttrl_shared = {"plan": plan, "next": 0, "error": None, "bytes": 0, "t0": time.perf_counter()}
        return len(plan)

    def ttrl_shared_bucket(self, index: int, handle: dict) -> int:
        """Load bucket `index` from the sender's buffer, in place; returns its bytes.

        The buffer is only read, and on return nothing of it is still being
        read (CUDA: the stream is synchronised), so the sender may drop it.
        """
        import torch
        from vllm.config import set_current_vllm_config

        from ttrl.rollout.ipc import open_shared
        from ttrl.rollout.nccl_sync import unpack_bucket

        st = self._ttrl_next_bucket("_ttrl_shared", "ttrl_shared_bucket", "ttrl_shared_begin", "bucket", index)
        buf = open_shared(handle, self.device)
        named = unpack_bucket(buf, st["plan"][index])
        del buf
        if st["error"] is None:
            try:
                with set_current_vllm_config(self.vllm_config), torch.no_grad():
                    self.model_runner.get_model().load_weights(named)
            except Exception as e:  # finish the round (end() rebuilds the model), then report
                st["error"] = e
        if self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()
        st["next"] += 1
        n = st["plan"][index].nbytes
        st["bytes"] += n
        return n

    def ttrl_shared_end(self) -> dict[str, float]:
        """End the round: rebuild every layer (those that got nothing keep their old tensors), then report.

        Raises when a bucket failed to load or the round stopped short; the
        model is back on its device either way, but then some layers are new,
        some old, and a layer that got only part of its tensors holds garbage
        in the rest: the caller must not mark the engine as holding the new
        version (it is then re-synced in full).
        """
        import torch
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        st = getattr(self, "_ttrl_shared", None)
        if st is None:
            return {"bytes": 0.0, "receive_s": 0.0}
        self._ttrl_shared = None
        with set_current_vllm_config(self.vllm_config), torch.no_grad():
            finalize_layerwise_reload(self.model_runner.get_model(), self.model_config)
        if self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()
        self._ttrl_after_reload()
        if st["error"] is not None:
            raise RuntimeError(f"weight sync: loading a shared bucket failed: {st['error']!r}") from st["error"]
        if st["next"] != len(st["plan"]):
            raise RuntimeError(f"weight sync: the round ended after {st['next']} of {len(st['plan'])} buckets")
        return {"bytes": float(st["bytes"]), "receive_s": time.perf_counter() - st["t0"]}

    def ttrl_shared_probe(self, handle: dict) -> int:
        """Open a handle and checksum its bytes: can this worker map the trainer rank's memory?"""
        from ttrl.rollout.ipc import checksum, open_shared

        return checksum(open_shared(handle, self.device))

    # ── GPU path: NCCL ────────────────────────────────────────────────────
    def ttrl_device_uuid(self) -> str:
        """This worker's GPU, to refuse a group where two ranks share one."""
        from ttrl.rollout.nccl_sync import gpu_uuid

        return gpu_uuid(self.device)

    def ttrl_init_weight_group(self, master_addr: str, master_port: int, rank_offset: int,
                               world_size: int) -> int:
        """Join the trainer's weight group as rank `rank_offset + this worker's rank`.

        Blocks until every rank (trainer rank 0 and all engine workers) has
        joined, so the caller starts all of them at once. Returns the rank.
        Calling it again replaces the group (after an engine restart, every
        member must join a new one: an NCCL group cannot take in a new peer).
        """
        from ttrl.rollout.nccl_sync import open_weight_group

        self.ttrl_close_weight_group()
        # self.rank: this worker's rank inside its engine (TP x PP), so the
        # workers of one engine take rank_offset .. rank_offset + TP*PP - 1.
        rank = rank_offset + self.rank
        self._ttrl_weight_comm = open_weight_group(master_addr, master_port, rank, world_size, self.device)
        return rank

    def ttrl_close_weight_group(self) -> None:
        comm = getattr(self, "_ttrl_weight_comm", None)
        if comm is not None:
            comm.destroy()
            self._ttrl_weight_comm = None

    def ttrl_receive_weights(self, bucket_metas: list[dict], timeout_s: float | None = None) -> dict[str, float]:
        """Receive one full set of weights by broadcast and reload it layer by layer.

        `bucket_metas` is the sender's plan (`nccl_sync.plan_to_wire`), already
        checked by the rollout actor against the checkpoint. The prefix cache
        is the caller's to reset (it lives in the engine core, not here).
        Past `timeout_s` the worker leaves the group and raises (the caller
        re-syncs it over the Ray path and opens a new group).
        """
        import torch
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import (
            finalize_layerwise_reload,
            initialize_layerwise_reload,
        )

        from ttrl.rollout.nccl_sync import plan_from_wire, receive_buckets

        comm = getattr(self, "_ttrl_weight_comm", None)
        if comm is None:
            raise RuntimeError("weight sync: ttrl_receive_weights before ttrl_init_weight_group")
        plan = plan_from_wire(bucket_metas)  # raises before the round starts
        t0 = time.perf_counter()
        cuda = self.device.type == "cuda"

        def bcast(buf):
            # The stream explicitly: vLLM's own current stream, on which the
            # model runs; the views of `buf` are consumed on it too.
            comm.broadcast(buf, src=0, stream=torch.cuda.current_stream() if cuda else None)

        model = self.model_runner.get_model()
        error: BaseException | None = None
        nbytes = 0
        with set_current_vllm_config(self.vllm_config), torch.no_grad():
            # Layerwise reload: every layer goes back to the meta device and
            # buffers what load_weights hands it; the layer is rebuilt on the
            # device, post-processed and copied into its old storage (so
            # CUDA graphs stay valid) as soon as all its tensors are in. That
            # is what makes streaming bucket by bucket legal here, where one
            # reload_weights call per bucket would not be.
            initialize_layerwise_reload(model)
            try:
                for named in receive_buckets(plan, bcast, self.device, timeout_s):
                    nbytes += sum(t.numel() * t.element_size() for _, t in named)
                    if error is None:
                        try:
                            model.load_weights(named)
                        except Exception as e:  # keep receiving: the sender is mid-round
                            error = e
            except BaseException:
                # The round itself failed (deadline passed, a peer gone):
                # abort this worker's end, or NCCL keeps it waiting for ever.
                self.ttrl_close_weight_group()
                raise
            finally:
                # Layers that got nothing get their old tensors back; without
                # this call they would stay on the meta device.
                finalize_layerwise_reload(model, self.model_config)
        if cuda:
            torch.cuda.current_stream().synchronize()  # the new weights are in place on return
        self._ttrl_after_reload()
        if error is not None:
            raise RuntimeError(f"weight sync: loading a received bucket failed: {error!r}") from error
        return {"bytes": float(nbytes), "receive_s": time.perf_counter() - t0}

    def _ttrl_next_bucket(self, attr: str, method: str, begin: str, what: str, index: int) -> dict:
        """The open colocated round's state (`attr`), checked that bucket `index` is the one it expects next."""
        st = getattr(self, attr, None)
        if st is None:
            raise RuntimeError(f"weight sync: {method} outside a round (no {begin})")
        if index != st["next"] or index >= len(st["plan"]):
            raise RuntimeError(f"weight sync: got {what} {index}, expected {st['next']} of {len(st['plan'])}")
        return st

    # ── LoRA: the adapter alone, installed in place ───────────────────────
    # With enable_lora the engine keeps its base weights; an adapter arrives by
    # any path above (same plans, wire names of rollout/lora.py), already
    # checked by the rollout actor against the shapes it expects, and replaces
    # the one adapter this worker serves in vLLM's LoRA manager: no file, no
    # reload of the base. A failed install leaves the old adapter removed only
    # if vLLM itself failed after the checks (the engine then serves the base,
    # its version stays the old one and the driver re-syncs it).
    def ttrl_install_adapter(self, buckets: list, plan_wire: list[dict], peft: dict) -> int:
        """Install an adapter from `nccl_sync.iter_store_buckets`' buckets (Ray path); returns its bytes."""
        from ttrl.rollout.nccl_sync import plan_from_wire, store_named

        tensors = {n: t.clone() for n, t in store_named(buckets, plan_from_wire(plan_wire))}
        return self._ttrl_install(tensors, peft)

    def ttrl_install_adapter_blobs(self, blobs: list[bytes], peft: dict) -> int:
        """Install an adapter from packed bytes (`weights.pack`: a served version, an adapter dir)."""
        from ttrl.rollout.weights import unpack

        tensors: dict = {}
        for blob in blobs:
            tensors.update(unpack(blob))
        return self._ttrl_install(tensors, peft)

    def ttrl_adapter_begin(self, plan_wire: list[dict]) -> int:
        """Colocated path: open a round that collects the adapter's buckets (installed at the end)."""
        from ttrl.rollout.nccl_sync import plan_from_wire

        plan = plan_from_wire(plan_wire)
        self._ttrl_adapter = {"plan": plan, "next": 0, "tensors": {}, "t0": time.perf_counter()}
        return len(plan)

    def ttrl_adapter_bucket(self, index: int, handle: dict) -> int:
        """Copy bucket `index` out of the sender's buffer (it may drop the buffer on return)."""
        from ttrl.rollout.ipc import open_shared
        from ttrl.rollout.nccl_sync import unpack_bucket

        st = self._ttrl_next_bucket("_ttrl_adapter", "ttrl_adapter_bucket", "ttrl_adapter_begin", "adapter bucket",
                                    index)
        buf = open_shared(handle, self.device)
        for name, view in unpack_bucket(buf, st["plan"][index]):
            st["tensors"][name] = view.clone()  # copied out: nothing here aliases the sender's buffer
        if self.device.type == "cuda":
            import torch

            torch.cuda.current_stream().synchronize()
        st["next"] += 1
        return st["plan"][index].nbytes

    def ttrl_adapter_end(self, peft: dict | None) -> dict[str, float]:
        """Close the round: install what came (`peft` None: the sender gave up; drop it, keep the old adapter)."""
        st = getattr(self, "_ttrl_adapter", None)
        self._ttrl_adapter = None
        if st is None or peft is None:
            return {"bytes": 0.0, "receive_s": 0.0}
        if st["next"] != len(st["plan"]):
            raise RuntimeError(f"weight sync: the adapter round ended after {st['next']} of {len(st['plan'])} "
                               "buckets")
        nbytes = self._ttrl_install(st["tensors"], peft)
        return {"bytes": float(nbytes), "receive_s": time.perf_counter() - st["t0"]}

    def ttrl_receive_adapter(self, bucket_metas: list[dict], peft: dict,
                             timeout_s: float | None = None) -> dict[str, float]:
        """GPU path: receive the adapter's buckets by broadcast, then install it."""
        import torch

        from ttrl.rollout.nccl_sync import plan_from_wire, receive_buckets

        comm = getattr(self, "_ttrl_weight_comm", None)
        if comm is None:
            raise RuntimeError("weight sync: ttrl_receive_adapter before ttrl_init_weight_group")
        plan = plan_from_wire(bucket_metas)
        t0 = time.perf_counter()
        cuda = self.device.type == "cuda"

        def bcast(buf):
            comm.broadcast(buf, src=0, stream=torch.cuda.current_stream() if cuda else None)

        tensors: dict = {}
        try:
            for named in receive_buckets(plan, bcast, self.device, timeout_s):
                tensors.update(named)  # views of a fresh buffer per bucket: nothing else holds them
        except BaseException:
            self.ttrl_close_weight_group()  # as ttrl_receive_weights: a failed round frees this worker
            raise
        if cuda:
            torch.cuda.current_stream().synchronize()
        nbytes = self._ttrl_install(tensors, peft)
        return {"bytes": float(nbytes), "receive_s": time.perf_counter() - t0}

    def _ttrl_install(self, tensors: dict, peft: dict) -> int:
        """Build a vLLM LoRAModel from `tensors` (wire names) and put it in place of the adapter served now.

        Everything that can fail on the adapter itself (its config against the
        engine's LoRA config, a module vLLM has no LoRA layer for) fails
        before the old adapter is removed.
        """
        from vllm.config import set_current_vllm_config
        from vllm.lora.lora_model import LoRAModel
        from vllm.lora.peft_helper import PEFTHelper

        from ttrl.rollout.lora import ADAPTER_ID

        manager = self.model_runner.lora_manager
        helper = PEFTHelper.from_dict(dict(peft))
        helper.validate_legal(manager.lora_config)
        adapters = manager._adapter_manager  # the LoRAModelManager: slots and layers
        model = LoRAModel.from_lora_tensors(ADAPTER_ID, tensors, helper, device="cpu",
                                            dtype=manager.lora_config.lora_dtype,
                                            model_vocab_size=manager.vocab_size)
        known = set(adapters.modules) | {m for subs in adapters.packed_modules.values() for m in subs}
        unknown = sorted(m for m in model.loras if m not in known)
        if unknown:
            raise ValueError(f"weight sync: this engine has no LoRA layer for {unknown[:3]}; refusing the adapter")
        with set_current_vllm_config(self.vllm_config):
            adapters.remove_adapter(ADAPTER_ID)
            adapters.add_adapter(model)
            adapters.activate_adapter(ADAPTER_ID)
            if adapters.capacity > 1:
                # Tenants' adapters share the cache (serve.tenants): the shared one has no file to be read
                # back from, so vLLM's LRU must never unload it. Removing it above unpinned it.
                adapters.pin_adapter(ADAPTER_ID)
        if self.device.type == "cuda":
            import torch

            torch.cuda.current_stream().synchronize()  # the slots hold the new weights on return
        return sum(t.numel() * t.element_size() for t in tensors.values())

    # ── LoRA: tenants' adapters, loaded and unloaded by vLLM's LRU ────────
    # With tenant slots vLLM reads a tenant's adapter from its folder the first
    # time a request names it, and drops the least recently used one when its
    # cache is full. These hooks only count what vLLM does (ttrl-serve reports
    # the counts); they change nothing in it.
    def ttrl_count_adapters(self) -> None:
        """Start counting tenant adapter loads (from disk) and unloads; once, at engine start."""
        from ttrl.rollout.lora import ADAPTER_ID

        worker = self.model_runner.lora_manager
        cache = worker._adapter_manager._registered_adapters  # vLLM's LRU of resident adapters
        counts = self._ttrl_adapter_counts = {"loads": 0, "unloads": 0}
        load, on_remove = worker._load_adapter, cache._on_remove

        def counted_load(request):
            lora = load(request)
            if request.lora_int_id != ADAPTER_ID:
                counts["loads"] += 1
            return lora

        def counted_remove(key, value):
            if key != ADAPTER_ID:
                counts["unloads"] += 1
            return on_remove(key, value)

        worker._load_adapter = counted_load
        cache._on_remove = counted_remove

    def ttrl_adapter_counts(self) -> dict:
        """Tenant adapter loads and unloads since the engine started, and the tenant adapters resident now."""
        from ttrl.rollout.lora import ADAPTER_ID

        counts = getattr(self, "_ttrl_adapter_counts", {"loads": 0, "unloads": 0})
        resident = sorted(i for i in self.model_runner.lora_manager.list_adapters() if i != ADAPTER_ID)
        return {**counts, "resident": resident}
