"""Frozen LLM text encoder: the second condition of ModelGrow (Sec. 3.3, "Text encoder with LLMs enhancement").

The prompt p (normally the merged short+long prompt p_sl) is wrapped in the LLM's chat template to give p*,
p* is run through a frozen causal LM, and the hidden state of one layer at the positions of the *user prompt*
tokens is the LLM condition c_llm: ``encode(prompts) -> (emb [B, 1, max_length, C] float32, mask [B, max_length]
int64)``, right-padded (padding positions of ``emb`` are zero).

Template cropping
    The template is rendered once with a sentinel in place of the user prompt and split there into a prefix
    (``<|begin_of_text|>...<|start_header_id|>user<|end_header_id|>\\n\\n``) and a suffix (``<|eot_id|>``). The
    prefix, the prompt and the suffix are tokenised *separately* (``add_special_tokens=False``: special tokens
    come from the template text, as in ``apply_chat_template``) and their ids concatenated, so the model sees
    ``prefix + prompt + suffix`` and no token ever straddles the prompt boundary. The hidden states are
    computed on that whole sequence (the prompt features carry the template context) and then cropped to the
    prompt positions: prefix *and* suffix are dropped, the kept tokens are exactly
    ``tokenizer(prompt, add_special_tokens=False).input_ids`` (see ``tokenize``). Prompts are stripped first
    (chat templates such as Llama-3's ``trim`` the message content). A prompt longer than ``max_length`` tokens
    is truncated to its first ``max_length`` tokens *before* the forward pass (the suffix still follows it).

Template source
    The tokenizer's own ``chat_template`` when it has one (system + user messages, no generation prompt; if the
    template rejects a system role the system instruction is put in front of the user message), else the
    built-in Llama-3 template ``LLAMA3_TEMPLATE`` (for a tokenizer without Llama-3's special tokens its markers
    are just text).

``use_template=False`` (the paper's "w/o template" ablation)
    The model input is exactly what ``tokenizer(prompt)`` gives (the tokenizer's usual special tokens, e.g. a
    BOS for tokenizers that add one, none for those that do not); the special tokens are cropped like the
    template, so the kept tokens are again the plain prompt tokens.
"""

from __future__ import annotations

import torch

from ._common import check_local_dir, freeze, load_pretrained, resolve_device, resolve_dtype

__all__ = ["LLMEncoder", "LLAMA3_TEMPLATE", "DEFAULT_SYSTEM_PROMPT"]

# The paper gives no wording for the embedding-time system instruction (Fig. 3 only shows the Llama-3 template);
# this one asks the model to understand the prompt as a video description.
DEFAULT_SYSTEM_PROMPT = (
    "You are an assistant for text-to-video generation. Read the user's video prompt carefully and understand "
    "the objects, their attributes, actions, motions, the scene and the camera described in it."
)

LLAMA3_TEMPLATE = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|>"
)

_SENTINEL = "\u2063MODELGROW_USER_PROMPT_7f3a\u2063"  # invisible separators: never produced by a template


class LLMEncoder:
    """Frozen causal LM as a text encoder (any ``transformers`` decoder: Llama, Mistral, Qwen, ...).

    Args:
        path: local model directory (config + weights + tokenizer files).
        max_length: number of prompt tokens kept (truncate / right-pad to it).
        layer: index into the model's ``hidden_states`` tuple (0 = embeddings, -1 = the last layer's output).
        system_prompt: system instruction of the template.
        use_template: False = the "w/o template" ablation (see the module docstring).
        device, dtype: default CUDA + bfloat16 when available, else CPU + float32.
    """

    def __init__(
        self,
        path: str,
        max_length: int = 256,
        layer: int = -1,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        use_template: bool = True,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> None:
        from transformers import AutoModel, AutoTokenizer

        path = check_local_dir(path, "LLM")
        device_ = resolve_device(device)
        dtype_ = resolve_dtype(dtype, device_)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        # the base model is enough for hidden states (no LM head in memory); AutoModel maps a *ForCausalLM
        # checkpoint to its base model
        model = load_pretrained(AutoModel, path, dtype_, ignore_unexpected=("lm_head.",))
        self._setup(model, tokenizer, max_length, layer, system_prompt, use_template, device_, dtype_)
        self.path = path

    @classmethod
    def from_model(cls, model, tokenizer, max_length: int = 256, layer: int = -1,
                   system_prompt: str = DEFAULT_SYSTEM_PROMPT, use_template: bool = True,
                   device: str | torch.device | None = None) -> LLMEncoder:
        """Wrap an already-built model and tokenizer (it is frozen and moved to ``device``)."""
        self = cls.__new__(cls)
        device_ = resolve_device(device) if device is not None else next(model.parameters()).device
        self._setup(model, tokenizer, max_length, layer, system_prompt, use_template, device_,
                    next(model.parameters()).dtype)
        self.path = None
        return self

    def _setup(self, model, tokenizer, max_length, layer, system_prompt, use_template, device, dtype) -> None:
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.model = freeze(model).to(device)
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.layer = int(layer)
        self.system_prompt = system_prompt
        self.use_template = bool(use_template)
        self.device = device
        self.dtype = dtype
        n_states = self.num_layers + 1
        if not -n_states <= self.layer < n_states:
            raise ValueError(f"layer {layer} out of range for {n_states} hidden states (embeddings + {n_states - 1} layers)")
        self.prefix_ids, self.suffix_ids = self._template_ids()
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.pad_id = int(pad)

    # ------------------------------------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def num_layers(self) -> int:
        cfg = self.model.config
        cfg = getattr(cfg, "text_config", None) or cfg
        return int(cfg.num_hidden_layers)

    def template_text(self, prompt: str) -> str:
        """The templated prompt p* as text (for inspection; ``encode`` tokenises its three parts separately)."""
        if not self.use_template:
            return prompt
        return self._render(prompt)

    def _render(self, prompt: str) -> str:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            msgs = [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": prompt}]
            try:
                return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
            except Exception:  # noqa: BLE001 - templates that reject the system role raise various errors
                msgs = [{"role": "user", "content": f"{self.system_prompt}\n\n{prompt}"}]
                return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
        return LLAMA3_TEMPLATE.format(system=self.system_prompt, prompt=prompt)

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def _template_ids(self) -> tuple[list[int], list[int]]:
        if self.use_template:
            rendered = self._render(_SENTINEL)
            if rendered.count(_SENTINEL) != 1:
                raise ValueError("the chat template does not contain the user message exactly once")
            prefix, suffix = rendered.split(_SENTINEL)
            return self._ids(prefix), self._ids(suffix)
        # w/o template: the tokenizer's own special tokens around a plain prompt (e.g. BOS), located by
        # tokenising a probe with and without them
        probe = "video"
        with_sp = list(self.tokenizer(probe, add_special_tokens=True)["input_ids"])
        plain = self._ids(probe)
        n = len(plain)
        for i in range(len(with_sp) - n + 1):
            if with_sp[i : i + n] == plain:
                return with_sp[:i], with_sp[i + n :]
        return [], []

    # ------------------------------------------------------------------------------------------------------
    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept prompt tokens: (ids [B, max_length], mask [B, max_length]), right-padded with ``pad_id``.

        ``ids[i, :n_i]`` equals ``tokenizer(prompts[i].strip(), add_special_tokens=False).input_ids[:max_length]``.
        """
        rows = self._prompt_ids(prompts)
        ids = torch.full((len(rows), self.max_length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), self.max_length), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        return ids, mask

    def _prompt_ids(self, prompts: list[str]) -> list[list[int]]:
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not a single string")
        return [self._ids(str(p).strip())[: self.max_length] for p in prompts]

    def model_inputs(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """The full model input: (input_ids [B, T], attention_mask [B, T], prompt lengths), right-padded;
        row i is ``prefix_ids + prompt_ids_i + suffix_ids``."""
        rows = self._prompt_ids(prompts)
        seqs = [self.prefix_ids + r + self.suffix_ids for r in rows]
        T = max(len(s) for s in seqs) if seqs else 0
        ids = torch.full((len(seqs), max(T, 1)), self.pad_id, dtype=torch.long)
        att = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            att[i, : len(s)] = 1
        return ids, att, [len(r) for r in rows]

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, att, lens = self.model_inputs(prompts)
        B, L, P = len(lens), self.max_length, len(self.prefix_ids)
        emb = torch.zeros((B, 1, L, self.hidden_size), dtype=torch.float32, device=self.device)
        mask = torch.zeros((B, L), dtype=torch.long, device=self.device)
        if B == 0:
            return emb, mask
        out = self.model(input_ids=ids.to(self.device), attention_mask=att.to(self.device),
                         output_hidden_states=True, use_cache=False)
        hs = out.hidden_states[self.layer]  # [B, T, C]
        for i, n in enumerate(lens):
            emb[i, 0, :n] = hs[i, P : P + n].float()
            mask[i, :n] = 1
        return emb, mask

    __call__ = encode
