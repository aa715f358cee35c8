"""The KV-state cache: keys, prefix index, KVC v2 rows, tiers with budgets, policy gates, counters.

Pure Python: nothing here touches native code, so the cache is built and property-tested on its own.
"""

from erllama.cache.counters import Counters, HitKind
from erllama.cache.filetier import FileTier
from erllama.cache.index import PrefixHit, PrefixIndex, RouteSummary, link_ids
from erllama.cache.key import (
    BLOCK_TOKENS,
    KEY_SCHEME,
    BlockHash,
    CacheKey,
    FingerprintMode,
    Namespace,
    block_chain,
    cache_key,
    ctx_params_hash,
    fingerprint,
    prefix_keys,
)
from erllama.cache.kvc import RowMeta, SaveReason, read_meta, read_row
from erllama.cache.policy import SavePolicy, Veto, allows_continued_save, allows_final_save, cold_save_point
from erllama.cache.report import CacheReport
from erllama.cache.store import CacheStore, RowInfo
from erllama.cache.tier import RamTier, Tier
from erllama.cache.writer import SaveWriter

__all__ = [
    "BLOCK_TOKENS",
    "KEY_SCHEME",
    "BlockHash",
    "CacheKey",
    "CacheReport",
    "CacheStore",
    "Counters",
    "FileTier",
    "FingerprintMode",
    "HitKind",
    "Namespace",
    "PrefixHit",
    "PrefixIndex",
    "RamTier",
    "RouteSummary",
    "RowInfo",
    "RowMeta",
    "SavePolicy",
    "SaveReason",
    "SaveWriter",
    "Tier",
    "Veto",
    "allows_continued_save",
    "allows_final_save",
    "block_chain",
    "cache_key",
    "cold_save_point",
    "ctx_params_hash",
    "fingerprint",
    "link_ids",
    "prefix_keys",
    "read_meta",
    "read_row",
]
