"""The policy: a seq2seq or causal translation model with a value head.

One interface for both kinds, so the algorithms never branch on model type:

* ``encode_sources`` turns source sentences into padded query tensors
  (right-padded encoder inputs for seq2seq; left-padded prompts for causal LMs,
  through the chat template when the tokenizer has one);
* ``generate`` samples responses (target tokens only, EOS included) and a mask
  that ends at the first EOS; ``sample`` also returns the log-probs and values
  of the sampling pass itself (no second forward);
* ``forward`` returns, for every response position, the log-probability of the
  taken token, the entropy of the next-token distribution and, when an algorithm
  added a value head (PPO), the value of the state before it (a linear head on
  the final hidden state).
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mtrl.errors import MtrlError, one_line
from mtrl.sampling import sampling_kwargs
from mtrl.schema import Range
from mtrl.vllm_engine import VLLMConfig

TINY_MARIAN = "mtrl:tiny-marian"  # the policy.model name of the shipped tiny Marian model
TINY_MARIAN_DIR = Path(__file__).parent / "data" / "tiny-marian"  # its files (fp16 weights; mtrl/data/README.md)
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # policy.dtype


@dataclass
class LoraConfig:
    r: Annotated[int, Range(ge=1)] = 8
    alpha: Annotated[int, Range(ge=1)] = 16
    dropout: Annotated[float, Range(ge=0, lt=1)] = 0.05
    target_modules: list[str] | str = "all-linear"


@dataclass
class PolicyConfig:
    model: str = ""  # hub id, local path or "mtrl:tiny-marian" (shipped); required
    kind: Literal["auto", "seq2seq", "causal"] = "auto"
    tokenizer: str | None = None  # defaults to the model's
    # Causal LMs: the user turn / prompt. {source}, {src_lang}, {tgt_lang} are filled in.
    prompt: str = "Translate the following {src_lang} text into {tgt_lang}.\n{src_lang}: {source}\n{tgt_lang}:"
    chat_template: Literal["auto", "never"] = "auto"  # use the tokenizer's chat template when it has one
    # Seq2seq: text put before each source (mT5 style), and NLLB/M2M language codes (e.g. eng_Latn, deu_Latn).
    source_prefix: str = ""
    src_lang_code: str | None = None
    tgt_lang_code: str | None = None
    max_source_tokens: Annotated[int, Range(ge=1)] = 256
    lora: LoraConfig | None = None
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"  # auto: the checkpoint's own
    gradient_checkpointing: bool = False
    # PPO value head: a linear head on the final hidden state. "detached": the value loss trains the head only
    # (a large, noisy value loss cannot swamp the policy gradient through the shared trunk); "shared": also the trunk.
    value_trunk: Literal["detached", "shared"] = "detached"


@dataclass
class GenerationConfig:
    max_new_tokens: Annotated[int, Range(ge=1)] = 64
    temperature: Annotated[float, Range(gt=0)] = 1.0
    top_p: Annotated[float, Range(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Range(ge=0)] = 0  # 0: off
    eval_num_beams: Annotated[int, Range(ge=1)] = 1
    eval_batch_size: Annotated[int, Range(ge=1)] = 64
    # sequences sampled per generate call (and per teacher-forced pass of the rollout), in whole sources;
    # null: the whole batch (batch_size x samples_per_prompt) at once. Unrelated to the update's minibatch_size.
    rollout_batch_size: Annotated[int, Range(ge=1)] | None = None
    # rollouts decode with a static KV cache and a torch.compile'd decoding step (CUDA graphs on a GPU);
    # the first calls compile (seconds to minutes). Off: it does not pay on a CPU (eval/results/seq2seq_sampler.md)
    compile: bool = False
    # what samples the rollouts: hf (transformers' generate, every policy) or vllm (causal policies; an engine
    # in the training process, mtrl.vllm_engine); evaluation decodes with hf
    engine: Literal["hf", "vllm"] = "hf"
    vllm: VLLMConfig = field(default_factory=VLLMConfig)


@dataclass
class PolicyOutput:
    logprobs: torch.Tensor  # (B, T) log p(token_t | state_t)
    entropy: torch.Tensor | None  # (B, T); None when not asked for
    values: torch.Tensor | None  # (B, T)


def detect_kind(config: Any) -> str:
    return "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"


def load_model_and_tokenizer(name: str, kind: str = "auto", tokenizer: str | None = None,
                             dtype: str = "fp32") -> tuple[Any, Any, str]:
    """Load a hub id or local directory; one clear error when it cannot be had (no network, wrong path)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    name = resolve_model(name)
    try:
        config = AutoConfig.from_pretrained(name)
        kind = detect_kind(config) if kind == "auto" else kind
        cls = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
        # transformers 5 draws from the global RNG while loading (it initialises weights the checkpoint then
        # overwrites); a run's seed must mean the same sampling stream whatever the transformers version.
        with torch.random.fork_rng(devices=[]):
            model = cls.from_pretrained(name, dtype=dtype if dtype == "auto" else TORCH_DTYPES[dtype])
        tok = AutoTokenizer.from_pretrained(tokenizer or name)
    except OSError as e:
        raise MtrlError(f"cannot load model {name!r}: {one_line(e)} "
                        "(no network? give a local directory saved with save_pretrained)") from None
    _refreeze(model, cls, config)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.model_input_names = ["input_ids", "attention_mask"]  # no token_type_ids (Marian rejects them)
    return model, tok, kind


def _refreeze(model: Any, cls: Any, config: Any) -> None:
    """Freeze again what the architecture keeps fixed (Marian's and Pegasus' sinusoidal position tables).

    ``from_pretrained`` (transformers 5) makes every parameter it loads or initialises trainable.
    Trained, Marian's tables would be lost on save (``save_pretrained`` leaves them out, loading
    rebuilds them), and where the model computes them without grad, DDP would wait for a gradient
    that never comes. A model of the same class built on the meta device (no memory, no weights)
    says which parameters those are.
    """
    with torch.device("meta"):
        fixed = {name for name, p in cls.from_config(config).named_parameters() if not p.requires_grad}
    for name, p in model.named_parameters():
        if name in fixed:
            p.requires_grad_(False)


class Policy(nn.Module):
    def __init__(self, model: Any, tokenizer: Any, kind: str, cfg: PolicyConfig | None = None,
                 src_lang: str = "English", tgt_lang: str = "German"):
        super().__init__()
        self.model, self.tokenizer, self.kind = model, tokenizer, kind
        self.cfg = cfg or PolicyConfig(model="")
        self.src_lang, self.tgt_lang = src_lang, tgt_lang
        self.value_head: nn.Linear | None = None
        self.truncated_sources = 0  # sources cut to source_limit by encode_sources, since the policy was built
        self.forced_bos_token_id = None
        if self.cfg.tgt_lang_code:
            if hasattr(tokenizer, "get_lang_id"):  # M2M100
                self.forced_bos_token_id = tokenizer.get_lang_id(self.cfg.tgt_lang_code)
            else:  # NLLB and friends: the language code is a token
                self.forced_bos_token_id = tokenizer.convert_tokens_to_ids(self.cfg.tgt_lang_code)
        if self.cfg.src_lang_code and hasattr(tokenizer, "src_lang"):
            tokenizer.src_lang = self.cfg.src_lang_code
        tokenizer.padding_side = "right" if kind == "seq2seq" else "left"

    def add_value_head(self) -> nn.Linear:
        """A linear value head on the final hidden state (PPO's critic); small random init, zero bias."""
        hidden = self.model.config.get_text_config().hidden_size if hasattr(self.model.config, "get_text_config") \
            else self.model.config.hidden_size
        self.value_head = nn.Linear(hidden, 1)
        nn.init.normal_(self.value_head.weight, std=1.0 / (hidden + 1) ** 0.5)
        nn.init.zeros_(self.value_head.bias)
        self.value_head.to(device=self.device, dtype=next(self.model.parameters()).dtype)
        return self.value_head

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ inputs
    def prompt_text(self, source: str) -> str:
        """The causal LM's prompt for one source (chat template when available)."""
        user = self.cfg.prompt.format(source=source, src_lang=self.src_lang, tgt_lang=self.tgt_lang)
        if self.cfg.chat_template == "auto" and getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                                      add_generation_prompt=True)
        return user

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the model's position table holds (a seq2seq model's source, or its target; a
        causal model's prompt and response together); None for relative positions (T5), which have no limit."""
        config = self.model.config
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        return getattr(config, "max_position_embeddings", None)

    @property
    def source_limit(self) -> int:
        """Source (or prompt) tokens kept: ``policy.max_source_tokens``, and no more than the positions."""
        return min(self.cfg.max_source_tokens, self.max_positions or self.cfg.max_source_tokens)

    def _source_texts(self, sources: Sequence[str]) -> tuple[list[str], bool]:
        """What the tokenizer reads for each source, and whether it adds its special tokens."""
        if self.kind == "seq2seq":
            return [self.cfg.source_prefix + s for s in sources], True
        templated = self.cfg.chat_template == "auto" and getattr(self.tokenizer, "chat_template", None)
        return [self.prompt_text(s) for s in sources], not templated

    def source_lengths(self, sources: Sequence[str]) -> list[int]:
        """Each source's (or prompt's) length in tokens, before any cut."""
        texts, special = self._source_texts(sources)
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=special)["input_ids"]]

    def encode_sources(self, sources: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and mask of the sources (causal: their prompts), padded, each cut to :attr:`source_limit`;
        ``truncated_sources`` counts the cut ones (the runner logs it)."""
        texts, special = self._source_texts(sources)
        limit = self.source_limit
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=limit, return_tensors="pt",
                             add_special_tokens=special)
        full = [i for i, n in enumerate(enc["attention_mask"].sum(1).tolist()) if n >= limit]
        if full:  # only rows that reach the limit can have been cut
            self.truncated_sources += sum(n > limit for n in self.source_lengths([sources[i] for i in full]))
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    # ------------------------------------------------------------------ sampling
    def length_kwargs(self, queries: torch.Tensor, max_new_tokens: int) -> dict[str, Any]:
        """``generate``'s limit of ``max_new_tokens`` response tokens, as its one ``max_length``.

        ``max_length`` counts the prefix that ``generate`` starts from (see :meth:`_responses`). Given
        as ``max_new_tokens``, the limit would meet the ``max_length`` that translation models'
        generation configs carry (opus-mt's, NLLB's), and transformers warns about the pair at every
        call; ``max_new_tokens=None`` keeps a generation config's own ``max_new_tokens`` out of it too.
        """
        return dict(max_length=self._prefix_length(queries) + max_new_tokens, max_new_tokens=None)

    def _generate_kwargs(self, gen: GenerationConfig, queries: torch.Tensor, sample: bool,
                         on_token: Any = None) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(**self.length_kwargs(queries, gen.max_new_tokens), use_cache=True,
                                      pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.eos_token_id)
        if sample:  # multinomial sampling by inverse CDF (mtrl.sampling: ~25x cheaper on a CPU)
            kwargs.update(sampling_kwargs(gen.temperature, gen.top_k, gen.top_p, on_token))
        else:
            kwargs.update(do_sample=False, num_beams=gen.eval_num_beams)
        if self.forced_bos_token_id is not None:
            kwargs["forced_bos_token_id"] = self.forced_bos_token_id
        return kwargs

    def _prefix_length(self, queries: torch.Tensor) -> int:
        """Tokens before the response in ``generate``'s output: the decoder start token, or the prompt."""
        return 1 if self.kind == "seq2seq" else queries.shape[1]

    def _responses(self, sequences: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        return sequences[:, self._prefix_length(queries):]

    @torch.no_grad()
    def generate(self, queries: torch.Tensor, query_mask: torch.Tensor, gen: GenerationConfig,
                 sample: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Responses (B, T) and their mask: 1 up to and including the first EOS."""
        out = self.model.generate(input_ids=queries, attention_mask=query_mask,
                                  **self._generate_kwargs(gen, queries, sample))
        responses = self._responses(out, queries)
        return responses, self.response_mask(responses)

    @torch.no_grad()
    def sample(self, queries: torch.Tensor, query_mask: torch.Tensor, gen: GenerationConfig,
               with_values: bool = False, samples_per_prompt: int = 1
               ) -> tuple[torch.Tensor, torch.Tensor, PolicyOutput]:
        """Sampled responses, their mask, and the sampling pass's own log-probs (and values): no second forward.

        ``samples_per_prompt`` samples of each query row: row ``i * samples_per_prompt + j`` of the outputs
        is sample ``j`` of query ``i``. A seq2seq policy runs its encoder once per query for all of them
        (:meth:`_sampling_inputs`); the samples, log-probs and values are those of the queries repeated
        ``samples_per_prompt`` times, for a given torch seed (bit for bit on a CPU; a GPU's kernels may
        round an encoder row differently in a batch of another size).

        Each step's raw logits (before top-k/top-p and the model's other logits processors) are read
        as the model returns them and kept only until the sampler has drawn that step's token: the
        log-prob of the drawn token at ``gen.temperature`` is all that stays, exactly what
        :meth:`forward` computes with the KV cache left out. Values come from the input of the LM
        head at the same step. Memory: O(B x T), never the B x T x V logits of all steps.
        """
        inputs = self._sampling_inputs(queries, query_mask, samples_per_prompt)
        queries = inputs["input_ids"]
        recorder = _StepRecorder(self.model, gen.temperature, self.value_head if with_values else None)
        kwargs = self._generate_kwargs(gen, queries, sample=True, on_token=recorder.take)
        with recorder, _compiled_decoding(self, gen, kwargs):
            out = self.model.generate(**inputs, **kwargs)
        responses = self._responses(out, queries)
        logprobs = torch.stack(recorder.logprobs, dim=1)[:, : responses.shape[1]]
        values = torch.stack(recorder.values, dim=1)[:, : responses.shape[1]] if with_values else None
        return responses, self.response_mask(responses), PolicyOutput(logprobs, None, values)

    def _sampling_inputs(self, queries: torch.Tensor, query_mask: torch.Tensor, samples_per_prompt: int
                         ) -> dict[str, Any]:
        """``generate``'s inputs for ``samples_per_prompt`` samples of each query, one row per sample.

        Seq2seq: the encoder runs here, once per query, and its output is repeated for the samples
        (what ``generate`` does inside for ``num_return_sequences``, which the sampler cannot use:
        it decodes greedily, :mod:`mtrl.sampling`); ``generate`` then starts from ``encoder_outputs``
        and runs only the decoder. The repeated ``input_ids`` stay for what reads them (processors of
        the encoder's input, the batch size). Causal: the prompts repeated.
        """
        k = samples_per_prompt
        inputs: dict[str, Any] = dict(input_ids=queries.repeat_interleave(k, 0) if k > 1 else queries,
                                      attention_mask=query_mask.repeat_interleave(k, 0) if k > 1 else query_mask)
        if self.kind == "seq2seq":
            from transformers.modeling_outputs import BaseModelOutput

            base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            hidden = base.get_encoder()(input_ids=queries, attention_mask=query_mask, return_dict=True)[0]
            inputs["encoder_outputs"] = BaseModelOutput(last_hidden_state=hidden.repeat_interleave(k, 0)
                                                        if k > 1 else hidden)
        return inputs

    @property
    def eos_token_id(self) -> int:
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if isinstance(gen_eos, list):
            gen_eos = gen_eos[0]
        return gen_eos if gen_eos is not None else self.tokenizer.eos_token_id

    def response_mask(self, responses: torch.Tensor) -> torch.Tensor:
        is_eos = responses == self.eos_token_id
        after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0  # strictly after the first EOS
        mask = (~after_eos).long()
        if self.forced_bos_token_id is not None:  # the forced language token is not a choice of the policy
            mask[:, 0] = 0
        return mask

    # ------------------------------------------------------------------ scoring
    def forward(self, queries: torch.Tensor, query_mask: torch.Tensor, responses: torch.Tensor,
                response_mask: torch.Tensor, temperature: float = 1.0, with_values: bool | None = None,
                model: Any = None, with_entropy: bool = True) -> PolicyOutput:
        """Log-probs (and entropy, values) of given responses, teacher-forced; ``with_values`` None: when a
        value head exists."""
        model = model if model is not None else self.model
        with_values = self.value_head is not None if with_values is None else with_values
        if self.kind == "seq2seq":
            start = model.config.decoder_start_token_id
            dec_in = torch.cat([torch.full_like(responses[:, :1], start), responses[:, :-1]], dim=1)
            out = model(input_ids=queries, attention_mask=query_mask, decoder_input_ids=dec_in,
                        output_hidden_states=with_values, use_cache=False)
            logits = out.logits
            hidden = out.decoder_hidden_states[-1] if with_values else None
        else:
            ids = torch.cat([queries, responses], dim=1)
            mask = torch.cat([query_mask, response_mask], dim=1)
            positions = (mask.cumsum(1) - 1).clamp(min=0)
            T = responses.shape[1]
            # the LM head only where a response token is predicted (the prompt's logits are never used)
            keep = {"logits_to_keep": T + 1} if _accepts_logits_to_keep(model) else {}
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                        output_hidden_states=with_values, use_cache=False, **keep)
            logits = out.logits[:, -T - 1:-1]
            hidden = out.hidden_states[-1][:, -T - 1:-1] if with_values else None
        logp_all = F.log_softmax(logits.float() / temperature, dim=-1)
        logprobs = torch.gather(logp_all, 2, responses.unsqueeze(-1)).squeeze(-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None
        values = None
        if with_values:  # by default the value loss trains the head only, not the policy's trunk
            hidden = hidden if self.cfg.value_trunk == "shared" else hidden.detach()
            values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()
        return PolicyOutput(logprobs, entropy, values)


def _accepts_logits_to_keep(model: Any) -> bool:
    """Whether a causal LM's forward takes ``logits_to_keep`` (most transformers models do; peft passes it on)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _forward_takes(type(base), "logits_to_keep")


@functools.cache
def _forward_takes(cls: type, name: str) -> bool:
    return name in inspect.signature(cls.forward).parameters


@contextmanager
def _compiled_decoding(policy: Policy, gen: GenerationConfig, kwargs: dict[str, Any]) -> Iterator[None]:
    """``generation.compile``: ``generate`` with a static KV cache, whose decoding steps transformers runs
    through ``torch.compile`` (mode ``reduce-overhead``: CUDA graphs on a GPU; plain Inductor on a CPU,
    where transformers compiles only when asked to).

    :class:`_StepRecorder`'s hooks run inside the compiled step. Dynamo by default does not guard on a
    module's hooks (it would keep running the hooks it was compiled with); here it does, so that a
    recorder with or without the value head's hook gets a graph of its own, compiled once."""
    if not gen.compile:
        yield
        return
    import torch._dynamo
    from transformers import CompileConfig

    cpu = policy.device.type == "cpu"
    config = CompileConfig(mode="default" if cpu else "reduce-overhead")
    config._compile_all_devices = cpu or None  # transformers compiles on GPUs only unless told
    kwargs.update(cache_implementation="static", compile_config=config)
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False):
        yield


class _StepRecorder:
    """Hooks on a model during ``generate``: each step's raw logits (and LM-head input, for values) are held
    until the sampler reports the drawn tokens, then reduced to one log-prob (and value) per row."""

    def __init__(self, model: Any, temperature: float, value_head: nn.Module | None = None):
        self.model = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: the HF model
        self.temperature, self.value_head = temperature, value_head
        self.logprobs: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._logits: torch.Tensor | None = None
        self._hidden: torch.Tensor | None = None

    def _keep_logits(self, module: Any, args: Any, output: Any) -> None:
        self._logits = output.logits[:, -1]

    def _keep_hidden(self, module: Any, args: Any) -> None:
        self._hidden = args[0][:, -1]

    def take(self, tokens: torch.Tensor) -> None:
        """The sampler drew ``tokens`` (B,) from the logits held since this step's forward."""
        logp = F.log_softmax(self._logits.float() / self.temperature, dim=-1)
        self.logprobs.append(logp.gather(1, tokens.unsqueeze(1)).squeeze(1))
        if self.value_head is not None:
            hidden = self._hidden.to(self.value_head.weight.dtype)
            self.values.append(self.value_head(hidden).squeeze(-1).float())
        self._logits = self._hidden = None

    def __enter__(self) -> _StepRecorder:
        self._hooks = [self.model.register_forward_hook(self._keep_logits)]
        if self.value_head is not None:
            self._hooks.append(self.model.get_output_embeddings().register_forward_pre_hook(self._keep_hidden))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._hooks:
            h.remove()


class ReferencePolicy:
    """The frozen reference for the KL penalty: a copy of the initial model, or LoRA's disabled adapter."""

    def __init__(self, policy: Policy):
        self.policy = policy
        self.uses_adapter = hasattr(policy.model, "disable_adapter")
        self.model = None if self.uses_adapter else copy.deepcopy(policy.model).eval().requires_grad_(False)

    @torch.no_grad()
    def logprobs(self, queries, query_mask, responses, response_mask, temperature: float = 1.0) -> torch.Tensor:
        if self.uses_adapter:
            with self.policy.model.disable_adapter():
                return self.policy.forward(queries, query_mask, responses, response_mask, temperature,
                                           with_values=False, with_entropy=False).logprobs
        return self.policy.forward(queries, query_mask, responses, response_mask, temperature,
                                   with_values=False, model=self.model, with_entropy=False).logprobs


def apply_lora(model: Any, kind: str, cfg: Any) -> Any:
    """Wrap ``model`` with a LoRA adapter (peft); the frozen base is the KL reference."""
    from peft import LoraConfig, TaskType, get_peft_model

    task = TaskType.SEQ_2_SEQ_LM if kind == "seq2seq" else TaskType.CAUSAL_LM
    return get_peft_model(model, LoraConfig(task_type=task, r=cfg.r, lora_alpha=cfg.alpha,
                                            lora_dropout=cfg.dropout, target_modules=cfg.target_modules))


def resolve_model(name: str) -> str:
    """``mtrl:tiny-marian`` -> the shipped model's directory; anything else unchanged (hub id or path)."""
    return str(TINY_MARIAN_DIR) if name == TINY_MARIAN else name


def trainer_checkpointing(enabled: bool) -> dict[str, bool]:
    """TRL/transformers ``TrainingArguments``' activation-checkpointing switch under the name this transformers
    has: ``activation_checkpointing`` from 5.23, ``gradient_checkpointing`` before (5.19 is the newest that
    vLLM's CPU build accepts)."""
    from dataclasses import fields

    from transformers import TrainingArguments

    new = any(f.name == "activation_checkpointing" for f in fields(TrainingArguments))
    return {"activation_checkpointing" if new else "gradient_checkpointing": enabled}


def build_policy(cfg: PolicyConfig, model_path: str, src_lang: str, tgt_lang: str) -> Policy:
    model, tok, kind = load_model_and_tokenizer(resolve_model(model_path), cfg.kind, cfg.tokenizer, cfg.dtype)
    if cfg.lora is not None:
        model = apply_lora(model, kind, cfg.lora)
    if cfg.gradient_checkpointing:
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model.eval()  # no dropout: rollout and update log-probs must agree
    return Policy(model, tok, kind, cfg, src_lang, tgt_lang)
