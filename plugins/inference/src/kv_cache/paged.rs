//! v2301 `paged-kv`: keys and values in fixed-size blocks of tokens, drawn from one pool of a
//! fixed number of blocks that every sequence shares. Layers with the same attention window
//! form a group, and a group's block holds its layers' keys and values for its tokens; a
//! sequence holds a table of blocks per group, gains them as it grows, gives back those wholly
//! before a group's window, and gives back the rest when it ends or is preempted, so the memory
//! in use follows the tokens held (and, for windowed layers, seen), not the longest a request
//! may grow. Latent attention's compressed cache (keys only) is paged the same way.
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
            pool: Arc::new(Pool::new(
                self,
                config,
                cx.kv_dtype,
                shape,
                values,
                capacity,
            )),
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

/// A group's keys (and values) for a block's tokens: the group's `i`-th layer's token `t` is
/// slot `i · block + t` of each store.
#[derive(Clone)]
struct Slots {
    keys: KvStore,
    values: KvStore,
}

/// A block, shared (read-only) once full and cached.
type Block = Arc<Slots>;

/// Layers with the same attention window: they fill and release their blocks together.
struct Group {
    /// Blocks wholly before this window of a sequence's next query go back to the pool.
    window: Option<usize>,
    layers: usize,
}

#[derive(Default)]
struct Free {
    /// Blocks given back, by group, kept for the next sequence.
    blocks: Vec<Vec<Slots>>,
    /// Pages (one layer's block) held by a sequence or the prefix cache.
    in_use: usize,
    peak: usize,
    /// Full blocks (one per group) by the hash of their tokens and every token before them,
    /// with when each was last used; those no sequence holds are evicted, least recently
    /// used first.
    cached: HashMap<u64, (Vec<Block>, u64)>,
    clock: u64,
}

/// Whether only the prefix cache holds these blocks.
fn unheld(blocks: &[Block]) -> bool {
    blocks.iter().all(|b| Arc::strong_count(b) == 1)
}

/// The blocks every sequence draws from. It counts pages, one layer's keys and values for a
/// block's tokens, so that groups of different sizes share one budget; users see blocks of
/// every layer.
struct Pool {
    block: usize,
    layers: usize,
    dtype: KvDtype,
    shape: KvShape,
    /// Whether blocks hold values (latent attention caches keys only).
    values: bool,
    groups: Vec<Group>,
    /// Each layer's group and its place among the group's layers.
    placement: Vec<(usize, usize)>,
    /// In pages.
    capacity: usize,
    prefix_cache: bool,
    free: Mutex<Free>,
}

impl Pool {
    fn new(
        layout: &PagedLayout,
        config: &ModelConfig,
        dtype: KvDtype,
        shape: KvShape,
        values: bool,
        blocks: usize,
    ) -> Self {
        let mut groups: Vec<Group> = Vec::new();
        let placement = (0..config.num_layers)
            .map(|layer| {
                let window = config.sliding_layers.get(layer).copied().flatten();
                let g = match groups.iter().position(|g| g.window == window) {
                    Some(g) => g,
                    None => {
                        groups.push(Group { window, layers: 0 });
                        groups.len() - 1
                    }
                };
                groups[g].layers += 1;
                (g, groups[g].layers - 1)
            })
            .collect();
        Pool {
            block: layout.block,
            layers: config.num_layers,
            dtype,
            shape,
            values,
            free: Mutex::new(Free {
                blocks: groups.iter().map(|_| Vec::new()).collect(),
                ..Free::default()
            }),
            groups,
            placement,
            capacity: blocks.saturating_mul(config.num_layers),
            prefix_cache: layout.prefix_cache,
        }
    }

    fn fresh(&self, group: usize) -> Block {
        let slots = self.groups[group].layers * self.block;
        Arc::new(Slots {
            keys: KvStore::new(self.dtype, self.shape, slots),
            values: KvStore::new(self.dtype, self.shape, if self.values { slots } else { 0 }),
        })
    }

    fn free(&self) -> std::sync::MutexGuard<'_, Free> {
        // A panic elsewhere cannot leave the counts half-updated: each update is one statement.
        self.free.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The pages of `counts[g]` blocks of each group `g`.
    fn pages(&self, counts: impl IntoIterator<Item = usize>) -> usize {
        counts
            .into_iter()
            .zip(&self.groups)
            .map(|(n, g)| n * g.layers)
            .sum()
    }

    /// Pages as users count them: blocks of every layer.
    fn whole_blocks(&self, pages: usize) -> usize {
        pages.div_ceil(self.layers)
    }

    /// Drops the least recently used cached blocks no sequence holds; false if there are none.
    fn evict_one(&self, free: &mut Free) -> bool {
        let oldest = free
            .cached
            .iter()
            .filter(|(_, (blocks, _))| unheld(blocks))
            .min_by_key(|(_, (_, used))| *used)
            .map(|(hash, _)| *hash);
        let Some(hash) = oldest else { return false };
        let (blocks, _) = free.cached.remove(&hash).expect("just found");
        for (g, block) in blocks.into_iter().enumerate() {
            if let Ok(data) = Arc::try_unwrap(block) {
                free.blocks[g].push(data);
                free.in_use -= self.groups[g].layers;
            }
        }
        true
    }

    /// `counts[g]` blocks of each group `g`, all or none, evicting cached blocks no sequence
    /// holds to make room.
    fn take(
        &self,
        counts: &[usize],
        holding: usize,
        tokens: usize,
    ) -> Result<Vec<Vec<Block>>, KvFull> {
        let needed = self.pages(counts.iter().copied());
        let mut free = self.free();
        let unused = self.capacity.saturating_sub(free.in_use);
        // Cached blocks are counted (a scan) only when the unused ones do not suffice.
        let available = match needed > unused {
            true => {
                let evictable = free.cached.values().filter(|(b, _)| unheld(b)).count();
                unused + evictable * self.layers
            }
            false => unused,
        };
        if needed > available {
            return Err(KvFull {
                tokens,
                needed: self.whole_blocks(needed),
                holding: self.whole_blocks(holding),
                free: available / self.layers,
                capacity: self.capacity / self.layers,
                block: self.block,
                never_fits: holding + needed > self.capacity,
            });
        }
        while self.capacity.saturating_sub(free.in_use) < needed && self.evict_one(&mut free) {}
        free.in_use += needed;
        free.peak = free.peak.max(free.in_use);
        let reused: Vec<Vec<Block>> = counts
            .iter()
            .zip(&mut free.blocks)
            .map(|(&count, kept)| {
                let at = kept.len().saturating_sub(count);
                kept.drain(at..).map(Arc::new).collect()
            })
            .collect();
        drop(free);
        Ok(reused
            .into_iter()
            .zip(counts)
            .enumerate()
            .map(|(g, (mut blocks, &count))| {
                blocks.extend((blocks.len()..count).map(|_| self.fresh(g)));
                blocks
            })
            .collect())
    }

    /// A sequence's blocks of `group` back: those the cache also holds stay there.
    fn give(&self, group: usize, blocks: Vec<Block>) {
        let mut free = self.free();
        for block in blocks {
            if let Ok(data) = Arc::try_unwrap(block) {
                free.blocks[group].push(data);
                free.in_use -= self.groups[group].layers;
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
            tables: self.pool.groups.iter().map(|_| Table::default()).collect(),
            lens: vec![0; config.num_layers],
            tokens: Vec::new(),
            hashes: Vec::new(),
            salt: 0,
        })
    }

    fn usage(&self) -> Option<KvUsage> {
        let free = self.pool.free();
        Some(KvUsage {
            blocks_in_use: self.pool.whole_blocks(free.in_use),
            peak_blocks: self.pool.whole_blocks(free.peak),
            capacity: self.pool.capacity / self.pool.layers,
            block_tokens: self.pool.block,
        })
    }
}

/// One group's blocks of a sequence.
#[derive(Clone, Default)]
struct Table {
    /// The blocks from `released` on: those before fell out of the group's window.
    blocks: Vec<Block>,
    released: usize,
}

impl Table {
    /// Blocks up to here are held or were released.
    fn held(&self) -> usize {
        self.released + self.blocks.len()
    }
}

/// A clone (a fork) shares every block.
#[derive(Clone)]
struct PagedSequence {
    pool: Arc<Pool>,
    /// By group.
    tables: Vec<Table>,
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
            // A block one group already released cannot be offered whole.
            let Some(blocks) = self
                .tables
                .iter()
                .map(|t| b.checked_sub(t.released).map(|i| t.blocks[i].clone()))
                .collect::<Option<Vec<Block>>>()
            else {
                break;
            };
            let previous = b.checked_sub(1).map_or(self.salt, |p| self.hashes[p]);
            let hash = chain(previous, &self.tokens[b * block..(b + 1) * block]);
            free.cached.entry(hash).or_insert((blocks, now));
            self.hashes.push(hash);
        }
    }

    /// Gives back each group's blocks wholly before its window of a query at position `next`.
    /// Every later query sees less, and so does one after a rollback to `next`: the released
    /// tokens are never read again.
    fn release_before_window(&mut self, next: usize) {
        for (g, (table, group)) in self.tables.iter_mut().zip(&self.pool.groups).enumerate() {
            let Some(window) = group.window else {
                continue;
            };
            let first_seen = (next + 1).saturating_sub(window);
            let gone = (first_seen / self.pool.block)
                .saturating_sub(table.released)
                .min(table.blocks.len());
            if gone > 0 {
                self.pool.give(g, table.blocks.drain(..gone).collect());
                table.released += gone;
            }
        }
    }

    /// Pages held.
    fn holding(&self) -> usize {
        self.pool.pages(self.tables.iter().map(|t| t.blocks.len()))
    }
}

impl SequenceKv for PagedSequence {
    fn reserve(&mut self, tokens: &[u32]) -> Result<(), KvFull> {
        // Full blocks are offered to the prefix cache before any is released.
        self.cache_full_blocks();
        let longest = self.lens.iter().copied().max().unwrap_or(0);
        self.release_before_window(longest);
        let block = self.pool.block;
        // The next token lands in a block another sequence or the cache shares (after a fork
        // or a truncation): this sequence writes its own copy.
        let last = longest / block;
        let copies: Vec<bool> = self
            .tables
            .iter()
            .map(|t| {
                !longest.is_multiple_of(block)
                    && Arc::strong_count(&t.blocks[last - t.released]) > 1
            })
            .collect();
        let wanted = (longest + tokens.len()).div_ceil(block);
        let counts: Vec<usize> = self
            .tables
            .iter()
            .zip(&copies)
            .map(|(t, &copy)| usize::from(copy) + wanted.saturating_sub(t.held()))
            .collect();
        if counts.iter().any(|&n| n > 0) {
            let taken = self.pool.take(&counts, self.holding(), tokens.len())?;
            for (g, mut blocks) in taken.into_iter().enumerate() {
                let table = &mut self.tables[g];
                if copies[g] {
                    let mut copy = blocks.remove(0);
                    let at = last - table.released;
                    *Arc::get_mut(&mut copy).expect("a block just taken is this sequence's") =
                        Slots::clone(&table.blocks[at]);
                    let shared = std::mem::replace(&mut table.blocks[at], copy);
                    self.pool.give(g, vec![shared]);
                }
                table.blocks.extend(blocks);
            }
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
        let empty = self.tables.iter().all(|t| t.held() == 0);
        if !self.pool.prefix_cache || !empty || tokens.is_empty() {
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
            for (table, block) in self.tables.iter_mut().zip(shared.iter()) {
                table.blocks.push(block.clone());
            }
            self.hashes.push(hash);
            self.tokens.extend_from_slice(piece);
            previous = hash;
        }
        let reused = self.hashes.len() * block;
        self.lens.iter_mut().for_each(|l| *l = reused);
        reused
    }

    fn truncate(&mut self, tokens: usize) {
        let block = self.pool.block;
        debug_assert!(
            self.tables.iter().all(|t| tokens >= t.released * block),
            "truncated into blocks released out of the window"
        );
        self.lens.iter_mut().for_each(|l| *l = (*l).min(tokens));
        let longest = self.lens.iter().copied().max().unwrap_or(0);
        for (g, table) in self.tables.iter_mut().enumerate() {
            let kept = longest.div_ceil(block).saturating_sub(table.released);
            let gone = table.blocks.split_off(kept.min(table.blocks.len()));
            self.pool.give(g, gone);
        }
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
        let (g, place) = self.pool.placement[layer];
        let group_layers = self.pool.groups[g].layers;
        // The batched forward reserves before it appends; a caller that did not is given its
        // blocks here, past the pool's count if need be, rather than lose the tokens.
        let needed = (self.lens[layer] + keys.rows).div_ceil(block);
        let missing = needed.saturating_sub(self.tables[g].held());
        if missing > 0 {
            let mut counts = vec![0; self.tables.len()];
            counts[g] = missing;
            let extra = match self.pool.take(&counts, self.holding(), keys.rows) {
                Ok(mut taken) => taken.swap_remove(g),
                Err(_) => {
                    self.pool.free().in_use += missing * group_layers;
                    (0..missing).map(|_| self.pool.fresh(g)).collect()
                }
            };
            self.tables[g].blocks.extend(extra);
        }
        let table = &mut self.tables[g];
        for r in 0..keys.rows {
            let position = self.lens[layer] + r;
            let b = (position / block).saturating_sub(table.released);
            let slot = place * block + position % block;
            if Arc::strong_count(&table.blocks[b]) > 1 {
                // Not reserved first: the copy is counted past the pool rather than lost.
                self.pool.free().in_use += group_layers;
            }
            let data = Arc::make_mut(&mut table.blocks[b]);
            data.keys.write(slot, keys.row(r));
            if self.pool.values && values.cols > 0 {
                data.values.write(slot, values.row(r));
            }
        }
        self.lens[layer] += keys.rows;
    }

    fn view(&self, layer: usize) -> KvView<'_> {
        let (block, len) = (self.pool.block, self.lens[layer]);
        let (g, place) = self.pool.placement[layer];
        let table = &self.tables[g];
        let slots = |b: usize| place * block..place * block + (len - b * block).min(block);
        let held = table.released..len.div_ceil(block).max(table.released);
        let blocks = || held.clone().zip(&table.blocks);
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
            first: table.released * block,
            dtype: self.pool.dtype,
        }
    }
}

impl Drop for PagedSequence {
    fn drop(&mut self) {
        self.cache_full_blocks();
        for (g, table) in self.tables.iter_mut().enumerate() {
            self.pool.give(g, std::mem::take(&mut table.blocks));
        }
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
