//! v2301 `paged-kv`: keys and values in fixed-size blocks of tokens, drawn from one pool of a
//! fixed number of blocks that every sequence shares. A block holds every layer's keys and
//! values for its tokens; a sequence holds a table of blocks, gains them as it grows and gives
//! them back when it ends or is preempted, so the memory in use follows the tokens held, not
//! the longest a request may grow. Latent attention's compressed cache (keys only) is paged
//! the same way.
//!
//! `--plugin-config paged-kv=block=16,blocks=N` (or `memory=GB` for the pool's size; the
//! default is 16-token blocks and 1 GiB).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{bail, Context};
use vibee_core::backend::kv::{KvChunk, KvDtype, KvShape, KvStore};
use vibee_core::config::ModelConfig;
use vibee_core::model::ops::{
    BuildContext, Factory, KvCache, KvFull, KvUsage, KvView, Operator, SequenceKv,
};
use vibee_core::serving::external::PluginConfigs;
use vibee_core::{App, Matrix, Plugin, PluginSpec};

pub struct PagedKv;

/// Tokens per block unless configured.
const DEFAULT_BLOCK: usize = 16;
/// The pool's size unless configured.
const DEFAULT_MEMORY: f64 = 1.0;
/// The largest block accepted: beyond it a block wastes more than paging saves.
const MAX_BLOCK: usize = 4096;

impl Plugin for PagedKv {
    fn spec(&self) -> PluginSpec {
        PluginSpec {
            id: "v2301",
            name: "paged-kv",
        }
    }

    fn build(&self, app: &mut App) -> anyhow::Result<()> {
        register(app, "paged-kv", false)
    }
}

/// Registers the paged layout `plugin`'s configuration describes.
pub fn register(app: &mut App, plugin: &str, prefix_cache: bool) -> anyhow::Result<()> {
    let text = app
        .world
        .get_resource::<PluginConfigs>()
        .and_then(|c| c.0.get(plugin).cloned())
        .unwrap_or_default();
    let layout = PagedLayout::parse(&text, prefix_cache)
        .with_context(|| format!("{plugin}'s configuration `{text}`"))?;
    app.register_operator(Operator::KvCache(Arc::new(layout)));
    Ok(())
}

/// How big the pool is: a number of blocks, or the bytes they may take.
#[derive(Clone, Copy, Debug, PartialEq)]
enum PoolSize {
    Blocks(usize),
    Gigabytes(f64),
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PagedLayout {
    block: usize,
    size: PoolSize,
    /// Full blocks are kept, keyed by their tokens, for later sequences with the same prefix.
    prefix_cache: bool,
}

impl PagedLayout {
    /// `block=T,blocks=N` or `block=T,memory=GB`, any part left out for its default.
    pub fn parse(text: &str, prefix_cache: bool) -> anyhow::Result<Self> {
        let mut layout = PagedLayout {
            block: DEFAULT_BLOCK,
            size: PoolSize::Gigabytes(DEFAULT_MEMORY),
            prefix_cache,
        };
        for part in text.split(',').filter(|p| !p.trim().is_empty()) {
            let (key, value) = part
                .split_once('=')
                .with_context(|| format!("`{part}` is not KEY=VALUE"))?;
            let whole = || -> anyhow::Result<usize> {
                match value.trim().parse::<usize>() {
                    Ok(n) if n > 0 => Ok(n),
                    _ => bail!("`{key}` must be a positive whole number, got `{value}`"),
                }
            };
            match key.trim() {
                "block" => layout.block = whole()?,
                "blocks" => layout.size = PoolSize::Blocks(whole()?),
                "memory" => match value.trim().parse::<f64>() {
                    Ok(gb) if gb > 0.0 && gb.is_finite() => layout.size = PoolSize::Gigabytes(gb),
                    _ => bail!("`memory` must be a positive number of GB, got `{value}`"),
                },
                other => bail!("unknown setting `{other}` (block, blocks, memory)"),
            }
        }
        if layout.block > MAX_BLOCK {
            bail!("`block` is {}: at most {MAX_BLOCK} tokens", layout.block);
        }
        Ok(layout)
    }
}

impl Factory<dyn KvCache> for PagedLayout {
    fn check(&self, _config: &ModelConfig) -> Result<(), String> {
        Ok(())
    }

    fn build(
        &self,
        cx: &BuildContext<'_>,
        _prefix: &str,
        _dim: usize,
    ) -> anyhow::Result<Box<dyn KvCache>> {
        let config = cx.config;
        // Latent attention caches one latent per token, no values.
        let values = config.mla.is_none();
        let shape = KvShape::of(config);
        let block_bytes = self.block
            * config.num_layers
            * cx.kv_dtype.token_bytes(shape)
            * if values { 2 } else { 1 };
        let capacity = match self.size {
            PoolSize::Blocks(n) => n,
            PoolSize::Gigabytes(gb) => (gb * 1e9 / block_bytes as f64) as usize,
        };
        // In f64: a hostile block count must not overflow the product.
        let bytes = capacity as f64 * block_bytes as f64;
        if let Some(total) = machine_memory() {
            if bytes > total as f64 {
                bail!(
                    "paged-kv: a pool of {capacity} blocks takes {:.2} GB, more than this machine's {:.2} GB",
                    bytes / 1e9,
                    total as f64 / 1e9
                );
            }
        }
        if capacity == 0 {
            bail!(
                "paged-kv: the pool holds no block of {} tokens ({block_bytes} bytes each)",
                self.block
            );
        }
        Ok(Box::new(PagedCache {
            pool: Arc::new(Pool {
                block: self.block,
                layers: config.num_layers,
                dtype: cx.kv_dtype,
                shape,
                values,
                window: config
                    .sliding_layers
                    .iter()
                    .copied()
                    .collect::<Option<Vec<usize>>>()
                    .and_then(|windows| windows.into_iter().max()),
                capacity,
                prefix_cache: self.prefix_cache,
                free: Mutex::new(Free::default()),
            }),
        }))
    }
}

/// The machine's memory (Linux `MemTotal`), when the system says.
fn machine_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Every layer's keys (and values) for a block's tokens: layer `l`'s token `t` is slot
/// `l · block + t` of each store.
#[derive(Clone)]
struct Slots {
    keys: KvStore,
    values: KvStore,
}

/// A block, shared (read-only) once full and cached.
type Block = Arc<Slots>;

#[derive(Default)]
struct Free {
    /// Blocks given back, kept for the next sequence.
    blocks: Vec<Slots>,
    /// Blocks held by a sequence or the prefix cache.
    in_use: usize,
    peak: usize,
    /// Full blocks by the hash of their tokens and every token before them, with when each
    /// was last used; those no sequence holds are evicted, least recently used first.
    cached: HashMap<u64, (Block, u64)>,
    clock: u64,
}

impl Free {
    /// Cached blocks no sequence holds.
    fn evictable(&self) -> usize {
        self.cached
            .values()
            .filter(|(b, _)| Arc::strong_count(b) == 1)
            .count()
    }

    /// Drops the least recently used cached block no sequence holds; false if there is none.
    fn evict_one(&mut self) -> bool {
        let oldest = self
            .cached
            .iter()
            .filter(|(_, (b, _))| Arc::strong_count(b) == 1)
            .min_by_key(|(_, (_, used))| *used)
            .map(|(hash, _)| *hash);
        let Some(hash) = oldest else { return false };
        let (block, _) = self.cached.remove(&hash).expect("just found");
        if let Ok(data) = Arc::try_unwrap(block) {
            self.blocks.push(data);
            self.in_use -= 1;
        }
        true
    }
}

/// The blocks every sequence draws from.
struct Pool {
    block: usize,
    layers: usize,
    dtype: KvDtype,
    shape: KvShape,
    /// Whether blocks hold values (latent attention caches keys only).
    values: bool,
    /// The widest attention window, when every layer has one: blocks wholly before the
    /// window of a sequence's next query go back to the pool.
    window: Option<usize>,
    capacity: usize,
    prefix_cache: bool,
    free: Mutex<Free>,
}

impl Pool {
    fn fresh(&self) -> Block {
        let slots = self.layers * self.block;
        Arc::new(Slots {
            keys: KvStore::new(self.dtype, self.shape, slots),
            values: KvStore::new(self.dtype, self.shape, if self.values { slots } else { 0 }),
        })
    }

    fn free(&self) -> std::sync::MutexGuard<'_, Free> {
        // A panic elsewhere cannot leave the counts half-updated: each update is one statement.
        self.free.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `count` blocks, all or none, evicting cached blocks no sequence holds to make room.
    fn take(&self, count: usize, holding: usize, tokens: usize) -> Result<Vec<Block>, KvFull> {
        let mut free = self.free();
        let unused = self.capacity.saturating_sub(free.in_use);
        // Cached blocks are counted (a scan) only when the unused ones do not suffice.
        let available = match count > unused {
            true => unused + free.evictable(),
            false => unused,
        };
        if count > available {
            return Err(KvFull {
                tokens,
                needed: count,
                holding,
                free: available,
                capacity: self.capacity,
                block: self.block,
            });
        }
        while self.capacity.saturating_sub(free.in_use) < count && free.evict_one() {}
        free.in_use += count;
        free.peak = free.peak.max(free.in_use);
        let reused = free.blocks.len().min(count);
        let at = free.blocks.len() - reused;
        let mut blocks: Vec<Block> = free.blocks.drain(at..).map(Arc::new).collect();
        drop(free);
        blocks.extend((reused..count).map(|_| self.fresh()));
        Ok(blocks)
    }

    /// A sequence's blocks back: those the cache also holds stay there.
    fn give(&self, blocks: Vec<Block>) {
        let mut free = self.free();
        for block in blocks {
            if let Ok(data) = Arc::try_unwrap(block) {
                free.blocks.push(data);
                free.in_use -= 1;
            }
        }
    }
}

/// The hash of a block's tokens (or of a salt's bytes) chained to the hash of everything
/// before them.
fn chain<T: std::hash::Hash>(previous: u64, items: &[T]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    previous.hash(&mut hasher);
    items.hash(&mut hasher);
    hasher.finish()
}

struct PagedCache {
    pool: Arc<Pool>,
}

impl KvCache for PagedCache {
    fn new_sequence(&self, config: &ModelConfig) -> Box<dyn SequenceKv> {
        Box::new(PagedSequence {
            pool: self.pool.clone(),
            blocks: Vec::new(),
            released: 0,
            lens: vec![0; config.num_layers],
            tokens: Vec::new(),
            hashes: Vec::new(),
            salt: 0,
        })
    }

    fn usage(&self) -> Option<KvUsage> {
        let free = self.pool.free();
        Some(KvUsage {
            blocks_in_use: free.in_use,
            peak_blocks: free.peak,
            capacity: self.pool.capacity,
            block_tokens: self.pool.block,
        })
    }
}

/// A clone (a fork) shares every block.
#[derive(Clone)]
struct PagedSequence {
    pool: Arc<Pool>,
    /// The blocks from `released` on: those before fell out of every layer's window.
    blocks: Vec<Block>,
    released: usize,
    lens: Vec<usize>,
    /// The tokens reserved so far (with a prefix cache: the keys of its full blocks).
    tokens: Vec<u32>,
    /// The chained hash of each full block already offered to the cache.
    hashes: Vec<u64>,
    /// The seed of the chain: only sequences with the same salt share blocks.
    salt: u64,
}

impl PagedSequence {
    /// Offers the blocks every layer has filled since the last call to the prefix cache.
    fn cache_full_blocks(&mut self) {
        let block = self.pool.block;
        let full = self.lens.iter().copied().min().unwrap_or(0) / block;
        if !self.pool.prefix_cache || full <= self.hashes.len() {
            return;
        }
        let mut free = self.pool.free();
        free.clock += 1;
        let now = free.clock;
        for b in self.hashes.len()..full {
            let previous = b.checked_sub(1).map_or(self.salt, |p| self.hashes[p]);
            let hash = chain(previous, &self.tokens[b * block..(b + 1) * block]);
            free.cached
                .entry(hash)
                .or_insert_with(|| (self.blocks[b - self.released].clone(), now));
            self.hashes.push(hash);
        }
    }

    /// Blocks up to here are held or were released.
    fn held(&self) -> usize {
        self.released + self.blocks.len()
    }

    /// Gives back the blocks wholly before the window of a query at position `next`. Every
    /// later query sees less, and so does one after a rollback to `next`: the released tokens
    /// are never read again.
    fn release_before_window(&mut self, next: usize) {
        let Some(window) = self.pool.window else {
            return;
        };
        let first_seen = (next + 1).saturating_sub(window);
        let gone = (first_seen / self.pool.block)
            .saturating_sub(self.released)
            .min(self.blocks.len());
        if gone > 0 {
            self.pool.give(self.blocks.drain(..gone).collect());
            self.released += gone;
        }
    }
}

impl SequenceKv for PagedSequence {
    fn reserve(&mut self, tokens: &[u32]) -> Result<(), KvFull> {
        // Full blocks are offered to the prefix cache before any is released.
        self.cache_full_blocks();
        let longest = self.lens.iter().copied().max().unwrap_or(0);
        self.release_before_window(longest);
        // The next token lands in a block another sequence or the cache shares (after a fork
        // or a truncation): this sequence writes its own copy.
        let last = (longest / self.pool.block).saturating_sub(self.released);
        if !longest.is_multiple_of(self.pool.block) && Arc::strong_count(&self.blocks[last]) > 1 {
            let mut copy = self
                .pool
                .take(1, self.blocks.len(), tokens.len())?
                .pop()
                .expect("one block");
            *Arc::get_mut(&mut copy).expect("a block just taken is this sequence's") =
                Slots::clone(&self.blocks[last]);
            let shared = std::mem::replace(&mut self.blocks[last], copy);
            self.pool.give(vec![shared]);
        }
        let blocks = (longest + tokens.len()).div_ceil(self.pool.block);
        if blocks > self.held() {
            let more = self
                .pool
                .take(blocks - self.held(), self.blocks.len(), tokens.len())?;
            self.blocks.extend(more);
        }
        if self.pool.prefix_cache {
            // By position: reserving the same next tokens twice (the scheduler, then the
            // forward) records them once.
            self.tokens.truncate(longest);
            self.tokens.extend_from_slice(tokens);
        }
        Ok(())
    }

    fn reuse_prefix(&mut self, tokens: &[u32], salt: Option<&str>) -> usize {
        let block = self.pool.block;
        if !self.pool.prefix_cache || self.held() > 0 || tokens.is_empty() {
            return 0;
        }
        // A salted chain never meets the unsalted one, whose seed is 0.
        let salt = salt.map_or(0, |s| chain(0, s.as_bytes()) | 1);
        self.salt = salt;
        let mut free = self.pool.free();
        free.clock += 1;
        let now = free.clock;
        let mut previous = salt;
        // The last token always runs: its logits are the request's first.
        for piece in tokens[..tokens.len() - 1].chunks_exact(block) {
            let hash = chain(previous, piece);
            let Some((shared, used)) = free.cached.get_mut(&hash) else {
                break;
            };
            *used = now;
            self.blocks.push(shared.clone());
            self.hashes.push(hash);
            self.tokens.extend_from_slice(piece);
            previous = hash;
        }
        let reused = self.blocks.len() * block;
        self.lens.iter_mut().for_each(|l| *l = reused);
        reused
    }

    fn truncate(&mut self, tokens: usize) {
        let block = self.pool.block;
        debug_assert!(
            tokens >= self.released * block,
            "truncated into blocks released out of the window"
        );
        self.lens.iter_mut().for_each(|l| *l = (*l).min(tokens));
        let longest = self.lens.iter().copied().max().unwrap_or(0);
        let kept = longest.div_ceil(block).saturating_sub(self.released);
        let gone = self.blocks.split_off(kept.min(self.blocks.len()));
        self.pool.give(gone);
        // A block cut short is no longer this sequence's to offer; the cache keeps its copy.
        self.hashes.truncate(longest / block);
        self.tokens.truncate(longest);
    }

    fn fork(&self) -> Box<dyn SequenceKv> {
        Box::new(self.clone())
    }

    fn len(&self, layer: usize) -> usize {
        self.lens[layer]
    }

    fn append(&mut self, layer: usize, keys: &Matrix, values: &Matrix) {
        let block = self.pool.block;
        // The batched forward reserves before it appends; a caller that did not is given its
        // blocks here, past the pool's count if need be, rather than lose the tokens.
        let needed = (self.lens[layer] + keys.rows).div_ceil(block);
        if needed > self.held() {
            let missing = needed - self.held();
            let extra = self
                .pool
                .take(missing, self.blocks.len(), keys.rows)
                .unwrap_or_else(|_| {
                    self.pool.free().in_use += missing;
                    (0..missing).map(|_| self.pool.fresh()).collect()
                });
            self.blocks.extend(extra);
        }
        for r in 0..keys.rows {
            let position = self.lens[layer] + r;
            let b = (position / block).saturating_sub(self.released);
            let slot = layer * block + position % block;
            if Arc::strong_count(&self.blocks[b]) > 1 {
                // Not reserved first: the copy is counted past the pool rather than lost.
                self.pool.free().in_use += 1;
            }
            let data = Arc::make_mut(&mut self.blocks[b]);
            data.keys.write(slot, keys.row(r));
            if self.pool.values && values.cols > 0 {
                data.values.write(slot, values.row(r));
            }
        }
        self.lens[layer] += keys.rows;
    }

    fn view(&self, layer: usize) -> KvView<'_> {
        let (block, len) = (self.pool.block, self.lens[layer]);
        let slots = |b: usize| layer * block..layer * block + (len - b * block).min(block);
        let held = self.released..len.div_ceil(block).max(self.released);
        let blocks = || held.clone().zip(&self.blocks);
        KvView {
            keys: blocks()
                .map(|(b, data)| data.keys.chunk(slots(b)))
                .collect(),
            values: blocks()
                .map(|(b, data)| match self.pool.values {
                    true => data.values.chunk(slots(b)),
                    false => KvChunk::EMPTY,
                })
                .collect(),
            tokens: len,
            first: self.released * block,
            dtype: self.pool.dtype,
        }
    }
}

impl Drop for PagedSequence {
    fn drop(&mut self) {
        self.cache_full_blocks();
        self.pool.give(std::mem::take(&mut self.blocks));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_and_bad_ones_are_named() {
        assert_eq!(
            PagedLayout::parse("block=4,blocks=10", false).unwrap(),
            PagedLayout {
                block: 4,
                size: PoolSize::Blocks(10),
                prefix_cache: false,
            }
        );
        assert_eq!(
            PagedLayout::parse("", true).unwrap().size,
            PoolSize::Gigabytes(DEFAULT_MEMORY)
        );
        for (text, expected) in [
            ("block=0", "`block` must be a positive whole number"),
            ("blocks=-3", "`blocks` must be a positive whole number"),
            ("memory=nan", "`memory` must be a positive number of GB"),
            ("pages=3", "unknown setting `pages`"),
            ("block", "`block` is not KEY=VALUE"),
            ("block=100000", "at most 4096 tokens"),
        ] {
            let e = format!("{:#}", PagedLayout::parse(text, false).unwrap_err());
            assert!(e.contains(expected), "{text}: {e}");
        }
    }
}
