"""The method: M LoRA members on one frozen model, run as one member-major batch.

    config.py      LoraEnsembleConfig (what to adapt, rank, init, heads)
    targets.py     which modules of a model get adapters, and which are its heads
    batch.py       member-major batches, the row contract, MemberModule (the base of every member-aware module)
    layers.py      the adapted projections (and BatchEnsemble's fast-weight layer)
    heads.py       per-member heads stacked on a leading member dimension
    attention.py   nn.MultiheadAttention with adapters on its fused in-projection
    ensemble.py    LoraEnsemble: injection, forward, member(m), checkpoints
    trunk.py       the shared trunk: frozen blocks before the first adapted one run on B rows
    trunk_cache.py TrunkCache: the shared trunk's output kept per training sample
    twin.py        ensemble_like: another LoraEnsemble (N members, any rank) on the frozen tensors of one

Imports only torch, safetensors and `lora_ensemble.io`.
"""
