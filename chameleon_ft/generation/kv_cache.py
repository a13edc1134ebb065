"""A static KV cache and the decoder that drives it: rows decode in parallel, each at its own length.

:class:`StaticKVCache` holds every layer's keys and values in buffers allocated once,
``[rows, kv_heads, capacity, head_dim]``. Each forward writes the new tokens' keys and values at slots
the caller chose per row, so

- rows of one batch may sit at different lengths (speculative decoding accepts a different number of
  tokens per sample), and
- dropping rejected draft tokens costs nothing: their slots are simply not committed and are
  overwritten by the next forward; nothing is copied or concatenated.

Buffers never change shape or address, so a decode step has static shapes and can be compiled
(:class:`CachedDecoder` with ``compile=True``; CUDA graphs on a GPU).

:class:`CachedDecoder` runs the model's decoder stack (embeddings, layers, final norm) against the cache
with an explicit 4D attention mask and explicit position ids, and leaves the LM head to the caller, so
image sampling can multiply by the image-code rows of the head only.
"""

from __future__ import annotations

import torch

from chameleon_ft.errors import ConfigError
from chameleon_ft.model.modeling import output_weight

# Attention implementations whose mask semantics the decoder knows: sdpa takes a boolean mask
# (True = attend); eager adds the mask to the scores, so it gets 0 / dtype-min.
MASK_KINDS = {"sdpa": "bool", "eager": "additive"}
# A compiled decode step has one graph per shape: capacities are rounded up to a multiple of this, so
# batches whose prompts differ a little in length reuse one graph.
COMPILED_CAPACITY_STEP = 256


class StaticKVCache:
    """Per-layer key/value buffers ``[rows, kv_heads, capacity, head_dim]``, written at per-row slots.

    Implements the one method transformers' attention layers call on a cache (``update``). The slots to
    write are set by :class:`CachedDecoder` before each forward (:attr:`write_slots`, ``[rows, q]``).
    Buffers are allocated at the first write, in the dtype of the keys (the model's compute dtype, also
    under autocast).
    """

    def __init__(self, num_layers: int, rows: int, capacity: int, device: torch.device):
        self.num_layers, self.rows, self.capacity, self.device = num_layers, rows, capacity, device
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.write_slots: torch.Tensor | None = None
        self.kv_len = capacity  # slots returned to attention: the filled prefix is enough when shapes may vary

    def _allocate(self, layer_idx: int, like: torch.Tensor) -> None:
        shape = (self.rows, like.shape[1], self.capacity, like.shape[3])
        for store in (self.keys, self.values):
            buf = torch.zeros(shape, dtype=like.dtype, device=like.device)
            # Fixed addresses let CUDA graphs (torch.compile mode="reduce-overhead") capture in-place writes.
            if not torch.compiler.is_compiling():
                torch._dynamo.mark_static_address(buf)
            store[layer_idx] = buf

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               kwargs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``[rows, kv_heads, q, head_dim]`` keys/values at :attr:`write_slots`; return the buffers' first
        :attr:`kv_len` slots."""
        if self.keys[layer_idx] is None:
            self._allocate(layer_idx, key_states)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        index = self.write_slots[:, None, :, None].expand(-1, key_states.shape[1], -1, key_states.shape[3])
        keys.scatter_(2, index, key_states.to(keys.dtype))
        values.scatter_(2, index, value_states.to(values.dtype))
        if self.kv_len < self.capacity:
            return keys[:, :, : self.kv_len], values[:, :, : self.kv_len]
        return keys, values


def unwrap_causal_lm(model):
    """The ``ChameleonFTForCausalLM`` inside ``model`` (itself, or the base model of a PEFT wrapper)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


class CachedDecoder:
    """``rows`` sequences decoded against one :class:`StaticKVCache` of ``capacity`` slots.

    State per row: :attr:`lengths` (slots committed: every token fed and kept so far, left padding
    included) and :attr:`pads` (slots of left padding, so a token's position is ``slot - pads``).
    :meth:`forward` feeds ``q`` tokens per row at slots ``lengths .. lengths + q - 1`` without committing
    them; :meth:`commit` keeps the first ``n`` of them per row. A token attends to the committed real
    tokens of its row and the tokens before it in the same forward.

    ``compile=True`` compiles :meth:`forward`'s model call with ``torch.compile`` (one graph per window
    size and capacity, which is rounded up to a multiple of :data:`COMPILED_CAPACITY_STEP`;
    ``mode="reduce-overhead"`` on CUDA, i.e. CUDA graphs, the default mode elsewhere). Compiled steps
    attend over the whole cache (masked), eager ones over the filled slots only.
    """

    def __init__(self, model, rows: int, capacity: int, *, compile: bool = False):
        self.lm = unwrap_causal_lm(model)
        self.decoder = self.lm.model
        config = self.lm.config
        impl = getattr(config, "_attn_implementation", None) or "eager"
        if impl not in MASK_KINDS:
            raise ConfigError(f"the static-cache decoder supports attn_implementation {sorted(MASK_KINDS)}, "
                              f"the model uses {impl!r}")
        self.mask_kind = MASK_KINDS[impl]
        param = next(self.lm.parameters())
        self.device, self.dtype = param.device, param.dtype
        if compile:
            capacity = -(-int(capacity) // COMPILED_CAPACITY_STEP) * COMPILED_CAPACITY_STEP
        self.rows, self.capacity = int(rows), int(capacity)
        self.cache = StaticKVCache(config.num_hidden_layers, self.rows, self.capacity, self.device)
        self.lengths = torch.zeros(self.rows, dtype=torch.long, device=self.device)
        self.pads = torch.zeros(self.rows, dtype=torch.long, device=self.device)
        self.prefilled = 0  # slots the prefill committed
        self.valid = torch.zeros(self.rows, self.capacity, dtype=torch.bool, device=self.device)
        self.slot_range = torch.arange(self.capacity, device=self.device)
        self.top = 0  # max(lengths), kept on the host (an int count needs no device sync)
        self.forward_passes = 0
        self._run = self._run_model
        self.compiled = bool(compile)
        if compile:
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            self._run = torch.compile(self._run_model, mode=mode, dynamic=False)

    # -- the model call (compiled when asked) -----------------------------------------------------------
    def _run_model(self, ids: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
                   kv_len: int) -> torch.Tensor:
        # Key slot s is visible to the query at slot t when s <= t and s holds a real token (or is t itself,
        # so a padding query attends to something and stays finite).
        keys = self.slot_range[None, None, :kv_len]
        visible = (keys <= slots[:, :, None]) & (valid[:, None, :kv_len] | (keys == slots[:, :, None]))
        mask = visible[:, None]
        if self.mask_kind == "additive":
            mask = torch.zeros(mask.shape, dtype=self.dtype, device=self.device).masked_fill(
                ~mask, torch.finfo(self.dtype).min)
        out = self.decoder(input_ids=ids, attention_mask=mask, position_ids=positions, cache=self.cache,
                           use_cache=False)
        return out.last_hidden_state

    # -- public API ---------------------------------------------------------------------------------------
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """Feed left-padded prompts ``[rows, T]`` (``attention_mask`` 0 at padding) and commit them; return the
        final hidden state of each row's last token, ``[rows, H]`` (None for ``T = 0``).

        A row that is all padding starts empty: its first real token will sit at position 0.
        """
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device).bool()
        if input_ids.shape[0] != self.rows:
            raise ConfigError(f"prefill got {input_ids.shape[0]} rows, the decoder has {self.rows}")
        T = input_ids.shape[1]
        if T > self.capacity:
            raise ConfigError(f"prompt of {T} tokens does not fit the cache of {self.capacity}")
        self.pads = (~attention_mask).sum(dim=1)
        self.prefilled = T
        if not T:
            return None
        hidden = self.forward(input_ids, real=attention_mask, compiled=False)
        self.commit(T)
        return hidden[:, -1]

    def forward(self, ids: torch.Tensor, real: torch.Tensor | None = None, *, compiled: bool = True) -> torch.Tensor:
        """Feed ``ids [rows, q]`` at each row's next slots; return the final hidden states ``[rows, q, H]``.

        ``real`` ``[rows, q]`` or ``[rows]`` marks which fed tokens are real (default all): tokens that are
        not (padding, idle rows) are visible to nobody but themselves. Nothing is committed.
        """
        ids = ids.to(self.device)
        q = ids.shape[1]
        if self.top + q > self.capacity:
            raise ConfigError(f"the KV cache of {self.capacity} slots is full")
        slots = self.lengths[:, None] + torch.arange(q, device=self.device)[None, :]
        if real is None:
            real = torch.ones_like(ids, dtype=torch.bool)
        elif real.dim() == 1:
            real = real[:, None].expand_as(ids)
        self.valid.scatter_(1, slots, real.to(self.device))
        self.cache.write_slots = slots
        self.forward_passes += 1
        compiled = compiled and self.compiled
        # Eager: attend over the filled slots only; compiled: over the whole cache, so shapes never change.
        kv_len = self.capacity if compiled else self.top + q
        run = self._run if compiled else self._run_model
        self.cache.kv_len = kv_len
        with torch.no_grad():
            return run(ids, slots, slots - self.pads[:, None], self.valid, kv_len)

    def commit(self, n: torch.Tensor | int) -> None:
        """Keep the first ``n`` (per row, or one count for all) tokens of the last :meth:`forward`."""
        if isinstance(n, int):
            self.lengths = self.lengths + n
            self.top += n
        else:
            self.lengths = self.lengths + n.to(self.device)
            self.top = int(self.lengths.max())

    def restart(self, rows: torch.Tensor) -> None:
        """Drop everything the ``rows`` (a boolean ``[rows]`` mask) committed after the prefill."""
        self.lengths = torch.where(rows.to(self.device), torch.full_like(self.lengths, self.prefilled), self.lengths)

    # -- heads --------------------------------------------------------------------------------------------
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits of ``hidden`` (the model's own LM head, adapters included)."""
        return self.lm.lm_head(hidden)

    def head_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The LM head's rows for token ``ids`` (``[len(ids), H]``), for logits over those tokens only."""
        return output_weight(self.lm.lm_head).detach()[ids.to(self.device)]
