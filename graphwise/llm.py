"""The offline API, in vLLM's shape: LLM(...).generate(prompts, sampling_params)."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Any

from tqdm import tqdm

from graphwise.config import EngineConfig
from graphwise.engine.client import EngineClient, create_engine_client
from graphwise.executor.worker import is_torchrun_worker, run_torchrun_worker
from graphwise.outputs import RequestOutput
from graphwise.sampling_params import SamplingParams
from graphwise.tokenizer import Message, apply_chat_template

Prompt = str | dict[str, Any]


class LLM:
    def __init__(
        self,
        model: str | None = None,
        dtype: str = "auto",
        device: str = "auto",
        max_num_seqs: int = 256,
        max_model_len: int | None = None,
        seed: int = 0,
        **engine_options: Any,
    ) -> None:
        config = EngineConfig.from_kwargs(
            model=model,
            dtype=dtype,
            device=device,
            max_num_seqs=max_num_seqs,
            max_model_len=max_model_len,
            seed=seed,
            **engine_options,
        )
        self.llm_engine = _engine_for(config)

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLM:
        llm = cls.__new__(cls)
        llm.llm_engine = _engine_for(config)
        return llm

    def shutdown(self) -> None:
        """Stop worker processes (tensor/pipeline/data parallel) now; otherwise at exit."""
        self.llm_engine.shutdown()

    def reset_prefix_cache(self) -> int:
        """Forget cached prompt blocks no request holds; returns how many were dropped."""
        return self.llm_engine.reset_prefix_cache()

    def get_tokenizer(self) -> Any:
        return self.llm_engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} sampling_params for {len(prompts)} prompts")
        engine = self.llm_engine
        ids: list[str] = []
        try:
            for prompt, p in zip(prompts, params, strict=True):
                text, token_ids = _parse_prompt(prompt)
                ids.append(engine.add_request(text, p, prompt_token_ids=token_ids))
        except BaseException:
            for rid in ids:  # nothing half-submitted stays queued
                engine.abort_request(rid)
            raise
        return self._run(ids, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        wanted = set(ids)
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm)
        try:
            while len(done) < len(ids):
                for out in engine.step():
                    if out.finished and out.request_id in wanted:
                        done[out.request_id] = out
                        bar.update(1)
            engine.drain()  # nothing left in flight once generate returns
        except BaseException:
            for rid in wanted - set(done):
                engine.abort_request(rid)
            raise
        finally:
            bar.close()
        return [done[rid] for rid in ids]

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[RequestOutput]:
        if messages and isinstance(messages[0], dict):
            conversations = [messages]
        else:
            conversations = list(messages)  # type: ignore[arg-type]
        prompts = [
            {"prompt_token_ids": self.apply_chat_template(c, add_generation_prompt, tools)}
            for c in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)  # type: ignore[arg-type]

    def apply_chat_template(
        self,
        conversation: list[Message],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """The conversation's prompt ids; `tools` (OpenAI's function specs) reach the template."""
        return apply_chat_template(self.get_tokenizer(), conversation, add_generation_prompt, tools)


def _engine_for(config: EngineConfig) -> EngineClient:
    """An LLMEngine, or with data_parallel_size > 1 a front over several engine processes.

    Under torchrun every process runs the user's script: rank 0 builds the engine, and on the
    other ranks this call serves as a model worker until rank 0 shuts down, then ends the
    process (the script's code after `LLM(...)` is rank 0's alone)."""
    if is_torchrun_worker():
        run_torchrun_worker(config)
        raise SystemExit(0)
    return create_engine_client(config)


def _parse_prompt(prompt: Prompt) -> tuple[str | None, list[int] | None]:
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            if not isinstance(ids, list):
                raise ValueError("prompt_token_ids must be a list of ints")
            return prompt.get("prompt"), list(ids)
        if "prompt" in prompt:
            return str(prompt["prompt"]), None
    raise ValueError(
        f"a prompt must be a string or {{'prompt_token_ids': [...]}}, got {type(prompt).__name__}"
    )
