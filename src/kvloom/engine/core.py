"""The synchronous engine core: one step = schedule, execute, sample, update."""

from __future__ import annotations

from kvloom.config import EngineConfig
from kvloom.errors import ConfigError
from kvloom.kv_cache.manager import KVCacheManager, KVCacheStats
from kvloom.models.config import ModelConfig, load_model_config
from kvloom.outputs import FinishReason
from kvloom.runner.model_runner import ModelRunner
from kvloom.scheduler.output import EngineCoreOutput
from kvloom.scheduler.request import Request
from kvloom.scheduler.scheduler import Scheduler


def resolve_max_model_len(config: EngineConfig, model: ModelConfig) -> int:
    limit = model.max_position_embeddings
    if config.max_model_len is None:
        return limit
    if config.max_model_len > limit:
        raise ConfigError(f"max_model_len ({config.max_model_len}) exceeds the model's max_position_embeddings ({limit})")
    return config.max_model_len


class EngineCore:
    """Owns the scheduler, KV manager and runner. Not thread-safe: one thread drives it."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_config = load_model_config(config.model)
        self.max_model_len = resolve_max_model_len(config, self.model_config)
        self.runner = ModelRunner(config, self.max_model_len)
        self.kv = KVCacheManager(
            self.runner.num_blocks, config.cache.block_size, enable_caching=config.cache.enable_prefix_caching
        )
        self.scheduler = Scheduler(config.scheduler, self.kv, self.max_model_len, config.lora.max_loras)

    @property
    def max_tokens_in_pool(self) -> int:
        return self.kv.num_blocks * self.kv.block_size

    def add_request(self, req: Request) -> None:
        self.scheduler.add_request(req)

    def finish_requests(self, req_ids: list[str], reason: FinishReason = "abort") -> None:
        self.scheduler.finish_requests(req_ids, reason)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[EngineCoreOutput]:
        sched = self.scheduler.schedule()
        logits = self.runner.execute(sched)
        sampled = self.runner.sample(logits)
        return self.scheduler.update(sched, sampled)

    def kv_cache_stats(self) -> KVCacheStats:
        return self.kv.stats()

    def assert_idle(self) -> None:
        """Invariant once all work is done: no request queued or running, every block free,
        every refcount zero, and the runner holds state only for requests it will drop at the
        next step."""
        assert not self.scheduler.requests, f"requests left: {sorted(self.scheduler.requests)}"
        assert not self.scheduler.waiting and not self.scheduler.running
        self.kv.check_all_free()
        leftover = set(self.runner.states) - self.scheduler.pending_finished_ids
        assert not leftover, f"runner still holds state for {sorted(leftover)}"
