"""`torch_compile: true` compiles each decoder block, as torchtitan does (and HF's and TRL's
`torch_compile` key compiles the whole model): graph breaks stay inside one block, and every block
of a model is the same code, so they share their compiled graphs.

Each block is compiled in place (`nn.Module.compile`): parameter names, `state_dict`, FSDP2's
per-block sharding (applied after; dynamo leaves FSDP's hooks out of the graph,
`skip_fsdp_hooks`), activation checkpointing and `save_pretrained` see the same model. Shapes: the
first batch compiles with its sequence length; a second length recompiles once with the length
dynamic (dynamo's automatic dynamic shapes), and no batch length after that compiles again
(`tests/test_logps.py` counts dynamo's graphs). Generation and the one-time log-prob check run the
blocks eagerly (`logps._eager_blocks`). If compiling the forward fails in a one-process run,
`PolicyLogps` turns the blocks back to eager with one line; under a process group it fails the
run instead (ranks falling back one by one would mismatch their collectives), and a failure
compiling the backward (AOTAutograd compiles it lazily) is not caught. Not measured on a GPU.
"""

from __future__ import annotations

from torch import nn


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's decoder blocks: its `_no_split_modules` classes (what FSDP shards by)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


class CompiledBlocks:
    """The decoder blocks of `model`, compiled in place; `eager()` undoes it."""

    def __init__(self, model: nn.Module, backend="inductor") -> None:
        self.blocks = decoder_blocks(model)
        if not self.blocks:
            from simpo_ray.errors import UserError

            raise UserError(f"torch_compile: true: {type(model).__name__} names no decoder block class "
                            "(_no_split_modules) to compile; set torch_compile: null (the head only) or false")
        for block in self.blocks:
            block.compile(backend=backend)
        self.active = True

    @staticmethod
    def tracing():
        """The dynamo settings the blocks are traced under. Under activation checkpointing a
        transformers block sets a context variable (its output capture: `CompileableContextVar`)
        that dynamo refuses to see mutated inside a checkpoint, so the whole block would run
        eagerly; that variable matters only for capturing attentions and hidden states, which
        training never asks for, so its set is not replayed in the backward's recomputation."""
        import torch._dynamo

        return torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True)

    def eager(self) -> None:
        for block in self.blocks:
            block._compiled_call_impl = None  # what nn.Module.compile set; None: the eager call
        self.active = False
