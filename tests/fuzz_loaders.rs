//! Seeded mutation fuzzing of every loader of untrusted files: GGUF, safetensors, tokenizer.json,
//! config.json, and quantized (AWQ, GPTQ, HQQ) checkpoint directories.
//!
//! Each family mutates the reference fixtures (byte flips, truncations, splices, integer fields
//! set to huge values, JSON values replaced) and loads the result. A case may fail to load, but
//! with an error: it must not panic, hang or allocate memory it has no reason to. Case `n` of a
//! family is the same input on every run; `VIBEE_FUZZ_CASE=n` runs only that one,
//! `VIBEE_FUZZ_CASES=N` runs more (or fewer) cases, and `VIBEE_FUZZ_VERBOSE=1` prints what each
//! case did and how it ended.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use vibee_core::config::ModelConfig;
use vibee_core::io::gguf::Gguf;
use vibee_core::io::tokenizer::Tokenizer;
use vibee_core::io::weights::Weights;
use vibee_core::serving::pipeline::SamplingParams;
use vibee_core::serving::{engine, runner};
use vibee_tests::{fixture, load};

/// Cases per family unless `VIBEE_FUZZ_CASES` says otherwise.
const CASES: u64 = 500;
/// A case that takes longer has hung (the fixtures load in milliseconds).
const CASE_TIME: Duration = Duration::from_secs(20);
/// More memory than a case may allocate beyond what was live when it started: the fixtures
/// are well under a megabyte, so anything near this was sized by a corrupt field.
const CASE_MEMORY: usize = 256 << 20;
/// Live memory at which the process stops at once, naming the case, rather than let a
/// corrupt length exhaust the machine.
const HARD_MEMORY: usize = 2 << 30;

/// Counts live heap bytes (and their peak) so cases can be held to a memory bound.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// The running case: family index in the top 16 bits, case number below.
static RUNNING: AtomicU64 = AtomicU64::new(u64::MAX);
const FAMILIES: [&str; 6] = [
    "gguf",
    "safetensors",
    "tokenizer",
    "config",
    "config-with-weights",
    "quantized",
];

impl Counting {
    fn grew(size: usize) {
        let live = LIVE.fetch_add(size, Relaxed) + size;
        PEAK.fetch_max(live, Relaxed);
        if live > HARD_MEMORY {
            abort_naming_the_case(size);
        }
    }
}

/// Reports the running case without allocating (the allocator is what called) and aborts.
fn abort_naming_the_case(size: usize) -> ! {
    fn number(mut n: u64, out: &mut [u8; 20]) -> &[u8] {
        let mut at = out.len();
        loop {
            at -= 1;
            out[at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                return &out[at..];
            }
        }
    }
    let running = RUNNING.load(Relaxed);
    let family = FAMILIES[((running >> 48) as usize).min(FAMILIES.len() - 1)];
    let mut stderr = std::io::stderr();
    let (mut a, mut b) = ([0u8; 20], [0u8; 20]);
    let _ = stderr.write_all(b"\nfuzz case ");
    let _ = stderr.write_all(family.as_bytes());
    let _ = stderr.write_all(b"/");
    let _ = stderr.write_all(number(running & 0xffff_ffff_ffff, &mut a));
    let _ = stderr.write_all(b" took more than 2 GiB of memory (allocating ");
    let _ = stderr.write_all(number(size as u64, &mut b));
    let _ = stderr.write_all(b" bytes); rerun it with VIBEE_FUZZ_CASE\n");
    std::process::abort()
}

// SAFETY: every call is forwarded to the system allocator unchanged; only counters are kept.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Self::grew(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Self::grew(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() {
            Self::grew(new_size - layout.size());
        } else {
            LIVE.fetch_sub(layout.size() - new_size, Relaxed);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// A case's input: the files of a directory, by name.
type Files = Vec<(String, Vec<u8>)>;

/// A seed: where it came from, and its files.
struct Seed {
    label: String,
    files: Files,
}

fn seed_dir(dir: &Path, skip: &[&str]) -> Seed {
    let mut files: Files = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), p))
        .filter(|(name, _)| !skip.contains(&name.as_str()))
        .map(|(name, path)| (name, std::fs::read(path).unwrap()))
        .collect();
    files.sort();
    Seed {
        label: dir.file_name().unwrap().to_string_lossy().into_owned(),
        files,
    }
}

fn file<'a>(files: &'a mut Files, name: &str) -> &'a mut Vec<u8> {
    &mut files.iter_mut().find(|(n, _)| n == name).unwrap().1
}

/// Integers a corrupt or hostile field holds: past every sane size, at type limits, at the
/// loaders' own caps (vibee's largest dimension and expert and layer counts), zero.
const HUGE: [u64; 12] = [
    u64::MAX,
    (1 << 63) - 1,
    1_000_000_000,
    u32::MAX as u64,
    1 << 31,
    1 << 32,
    1 << 40,
    1 << 24,
    4096,
    4097,
    0,
    1,
];

/// One mutation of the bytes of `data` within `region` (clamped to the data); `donor` is
/// other input to splice from. Returns what it did.
fn mutate_bytes(
    rng: &mut StdRng,
    data: &mut Vec<u8>,
    region: std::ops::Range<usize>,
    donor: &[u8],
) -> String {
    let end = region.end.min(data.len());
    let start = region.start.min(end);
    if start == end {
        data.truncate(rng.random_range(0..=data.len()));
        return format!("truncated to {} bytes", data.len());
    }
    let at = |rng: &mut StdRng| rng.random_range(start..end);
    match rng.random_range(0..6) {
        0 => {
            let n = rng.random_range(1..=8);
            for _ in 0..n {
                let p = at(rng);
                data[p] ^= 1 << rng.random_range(0..8);
            }
            format!("{n} bit flips")
        }
        1 => {
            let n = rng.random_range(1..=8);
            for _ in 0..n {
                let p = at(rng);
                data[p] = rng.random();
            }
            format!("{n} random bytes")
        }
        2 => {
            let len = rng.random_range(0..data.len());
            data.truncate(len);
            format!("truncated to {len} bytes")
        }
        3 => {
            let from = rng.random_range(0..donor.len().max(1));
            let len = rng
                .random_range(1..=4096)
                .min(donor.len() - from.min(donor.len()));
            let chunk = donor[from.min(donor.len())..][..len].to_vec();
            let p = at(rng);
            if rng.random_bool(0.5) {
                data.splice(p..p, chunk);
                format!("spliced {len} bytes in at {p}")
            } else {
                let n = len.min(data.len() - p);
                data[p..p + n].copy_from_slice(&chunk[..n]);
                format!("overwrote {n} bytes at {p}")
            }
        }
        4 => {
            let p = at(rng);
            let n = rng.random_range(1..=256).min(data.len() - p);
            data.drain(p..p + n);
            format!("deleted {n} bytes at {p}")
        }
        _ => {
            let value = HUGE[rng.random_range(0..HUGE.len())];
            let p = at(rng);
            write_int(data, p, if rng.random_bool(0.5) { 8 } else { 4 }, value);
            format!("wrote {value} at {p}")
        }
    }
}

/// Writes the low `width` bytes of `value`, little-endian, at `at` (as far as the data goes).
fn write_int(data: &mut [u8], at: usize, width: usize, value: u64) {
    let bytes = value.to_le_bytes();
    let n = width.min(data.len().saturating_sub(at));
    data[at..at + n].copy_from_slice(&bytes[..n]);
}

/// JSON Pointers to every value inside `value`.
fn pointers(value: &Value, at: String, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                let key = key.replace('~', "~0").replace('/', "~1");
                pointers(v, format!("{at}/{key}"), out);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                pointers(v, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
    out.push(at);
}

/// One semantic mutation of a JSON document: a value replaced by a huge or wrong-typed one,
/// a key or element removed, an element duplicated.
fn mutate_json(rng: &mut StdRng, doc: &mut Value) -> String {
    let mut all = Vec::new();
    pointers(doc, String::new(), &mut all);
    // Numbers are the interesting targets: sizes, ids, offsets.
    let numbers: Vec<&String> = all
        .iter()
        .filter(|p| doc.pointer(p).is_some_and(Value::is_number))
        .collect();
    let target = match (numbers.is_empty(), rng.random_bool(0.6)) {
        (false, true) => numbers[rng.random_range(0..numbers.len())].clone(),
        _ => all[rng.random_range(0..all.len())].clone(),
    };
    let replacement: Value = match rng.random_range(0..14) {
        0..=6 => HUGE[rng.random_range(0..HUGE.len())].into(),
        7 => (-1).into(),
        8 => (-(1i64 << 62)).into(),
        9 => 1e300.into(),
        10 => 0.5.into(),
        11 => "x".repeat(rng.random_range(0..3)).into(),
        12 => Value::Null,
        _ => {
            let value = doc.pointer_mut(&target).unwrap();
            match value {
                Value::Array(items) if !items.is_empty() => {
                    let i = rng.random_range(0..items.len());
                    if rng.random_bool(0.5) {
                        items.remove(i);
                        return format!("removed {target}/{i}");
                    }
                    let copy = items[i].clone();
                    items.push(copy);
                    return format!("duplicated {target}/{i}");
                }
                Value::Object(map) if !map.is_empty() => {
                    let key = map
                        .keys()
                        .nth(rng.random_range(0..map.len()))
                        .unwrap()
                        .clone();
                    map.remove(&key);
                    return format!("removed {target}/{key}");
                }
                _ => Value::Array(vec![]),
            }
        }
    };
    let what = format!("set {target} to {replacement}");
    *doc.pointer_mut(&target).unwrap() = replacement;
    what
}

/// One mutation of a safetensors header that the format itself still accepts (a shape with
/// the same element count, a dtype of the same width, two tensors' names swapped), so it
/// reaches vibee's own checks; or any JSON mutation.
fn mutate_safetensors_header(rng: &mut StdRng, header: &mut Value) -> String {
    let Value::Object(map) = header else {
        return mutate_json(rng, header);
    };
    let names: Vec<String> = map
        .keys()
        .filter(|k| *k != "__metadata__")
        .cloned()
        .collect();
    if names.is_empty() {
        return mutate_json(rng, header);
    }
    let name = names[rng.random_range(0..names.len())].clone();
    match rng.random_range(0..4) {
        0 => {
            let shape = map[&name]["shape"].as_array().cloned().unwrap_or_default();
            let numel: u64 = shape.iter().filter_map(Value::as_u64).product();
            let new: Vec<u64> = match rng.random_range(0..3) {
                0 => shape.iter().rev().filter_map(Value::as_u64).collect(),
                1 => vec![numel],
                _ => vec![1, numel, 1],
            };
            let what = format!("reshaped {name} from {shape:?} to {new:?}");
            map[&name]["shape"] = new.into();
            what
        }
        1 => {
            let dtype = map[&name]["dtype"].as_str().unwrap_or_default().to_string();
            let same_width: &[&str] = match dtype.as_str() {
                "F32" | "I32" | "U32" => &["F32", "I32", "U32"],
                "F16" | "BF16" | "I16" | "U16" => &["F16", "BF16", "I16", "U16"],
                "U8" | "I8" | "BOOL" => &["U8", "I8", "BOOL", "F8_E4M3", "F8_E5M2"],
                _ => &["I64", "U64", "F64"],
            };
            let new = same_width[rng.random_range(0..same_width.len())];
            map[&name]["dtype"] = new.into();
            format!("retyped {name} from {dtype} to {new}")
        }
        2 => {
            let other = names[rng.random_range(0..names.len())].clone();
            let (a, b) = (map[&name].clone(), map[&other].clone());
            (map[&name], map[&other]) = (b, a);
            format!("swapped {name} and {other}")
        }
        _ => mutate_json(rng, header),
    }
}

/// Mutates the safetensors file `name` of `files`: its header, through JSON (mostly), or its
/// header bytes.
fn mutate_safetensors(rng: &mut StdRng, files: &mut Files, name: &str, donor: &[u8]) -> String {
    let data = file(files, name);
    let header_len = u64::from_le_bytes(data[..8].try_into().unwrap()) as usize;
    let header = data
        .get(8..8 + header_len)
        .map(serde_json::from_slice::<Value>);
    if let (Some(Ok(mut doc)), true) = (header, rng.random_bool(0.7)) {
        let what = mutate_safetensors_header(rng, &mut doc);
        let text = serde_json::to_vec(&doc).unwrap();
        let mut out = (text.len() as u64).to_le_bytes().to_vec();
        out.extend(text);
        out.extend(&data[8 + header_len..]);
        *data = out;
        return format!("{name} header: {what}");
    }
    format!(
        "{name}: {}",
        mutate_bytes(rng, data, 0..8 + header_len, donor)
    )
}

/// Mutates the JSON file `name` of `files`: semantically when it parses (mostly), else or
/// otherwise byte by byte.
fn mutate_json_file(rng: &mut StdRng, files: &mut Files, name: &str, donor: &[u8]) -> String {
    let data = file(files, name);
    if rng.random_bool(0.75) {
        if let Ok(mut doc) = serde_json::from_slice::<Value>(data) {
            let mut what = Vec::new();
            for _ in 0..rng.random_range(1..=3) {
                what.push(mutate_json(rng, &mut doc));
            }
            *data = serde_json::to_vec(&doc).unwrap();
            return format!("{name}: {}", what.join(", "));
        }
    }
    let len = data.len();
    format!("{name}: {}", mutate_bytes(rng, data, 0..len, donor))
}

/// Where a GGUF file's integer fields are: `(offset, width)` of the version, counts, string
/// lengths, value types, array counts, tensor dims, types and offsets, as far as it parses.
fn gguf_fields(data: &[u8]) -> (Vec<(usize, usize)>, usize) {
    struct Walk<'a> {
        data: &'a [u8],
        at: usize,
        fields: Vec<(usize, usize)>,
    }
    impl Walk<'_> {
        fn int(&mut self, width: usize) -> Option<u64> {
            let bytes = self.data.get(self.at..self.at + width)?;
            self.fields.push((self.at, width));
            self.at += width;
            let mut full = [0u8; 8];
            full[..width].copy_from_slice(bytes);
            Some(u64::from_le_bytes(full))
        }
        fn skip(&mut self, n: u64) -> Option<()> {
            self.at = self.at.checked_add(usize::try_from(n).ok()?)?;
            (self.at <= self.data.len()).then_some(())
        }
        fn value(&mut self, kind: u64) -> Option<()> {
            match kind {
                0 | 1 | 7 => self.skip(1),
                2 | 3 => self.skip(2),
                4..=6 => self.skip(4),
                10..=12 => self.skip(8),
                8 => {
                    let len = self.int(8)?;
                    self.skip(len)
                }
                9 => {
                    let kind = self.int(4)?;
                    let count = self.int(8)?;
                    for _ in 0..count.min(self.data.len() as u64) {
                        self.value(kind)?;
                    }
                    Some(())
                }
                _ => None,
            }
        }
        fn file(&mut self) -> Option<()> {
            self.skip(4)?;
            self.int(4)?;
            let tensors = self.int(8)?;
            let kvs = self.int(8)?;
            for _ in 0..kvs {
                let len = self.int(8)?;
                self.skip(len)?;
                let kind = self.int(4)?;
                self.value(kind)?;
            }
            for _ in 0..tensors {
                let len = self.int(8)?;
                self.skip(len)?;
                let dims = self.int(4)?;
                for _ in 0..dims.min(16) {
                    self.int(8)?;
                }
                self.int(4)?;
                self.int(8)?;
            }
            Some(())
        }
    }
    let mut walk = Walk {
        data,
        at: 0,
        fields: Vec::new(),
    };
    walk.file();
    (walk.fields, walk.at)
}

/// Runs `cases` mutations of `seeds` through `check` (which loads the case's directory), each
/// on a worker thread: a panic, a case over [`CASE_TIME`] or one allocating over
/// [`CASE_MEMORY`] fails the test, naming the case.
fn fuzz(
    family: &'static str,
    seeds: Vec<Seed>,
    mutate: fn(&mut StdRng, &mut Files, &[u8]) -> String,
    check: fn(&Path) -> anyhow::Result<()>,
) {
    // The allocation counters are process-wide: one family at a time, however the tests run.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    assert!(!seeds.is_empty(), "{family} has no seeds");
    let index = FAMILIES.iter().position(|f| *f == family).unwrap() as u64;
    let cases: Vec<u64> = match std::env::var("VIBEE_FUZZ_CASE") {
        Ok(one) => vec![one.parse().expect("VIBEE_FUZZ_CASE is a case number")],
        Err(_) => {
            let count = std::env::var("VIBEE_FUZZ_CASES").map_or(CASES, |n| n.parse().unwrap());
            (0..count).collect()
        }
    };
    let verbose = std::env::var_os("VIBEE_FUZZ_VERBOSE").is_some();
    let root = std::env::temp_dir().join(format!("vibee-fuzz-{family}-{}", std::process::id()));
    let (to_worker, inbox) = mpsc::channel::<PathBuf>();
    let (to_main, results) = mpsc::channel::<Result<Result<(), String>, String>>();
    std::thread::spawn(move || {
        for dir in inbox {
            let outcome = catch_unwind(AssertUnwindSafe(|| check(&dir)));
            let outcome = match outcome {
                Ok(loaded) => Ok(loaded.map_err(|e| format!("{e:#}"))),
                Err(panic) => Err(panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()),
            };
            if to_main.send(outcome).is_err() {
                return;
            }
        }
    });
    let started = Instant::now();
    let (mut failures, mut loaded, mut slowest) = (Vec::new(), 0, Duration::ZERO);
    for case in cases {
        let mut rng = StdRng::seed_from_u64(index << 48 | case);
        let seed = &seeds[rng.random_range(0..seeds.len())];
        let donor = &seeds[rng.random_range(0..seeds.len())].files;
        let donor = &donor[rng.random_range(0..donor.len())].1;
        let mut files = seed.files.clone();
        let what = mutate(&mut rng, &mut files, donor);
        let dir = root.join(case.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in &files {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
        drop(files);
        let name = format!("{family} case {case} ({}: {what})", seed.label);
        let base = LIVE.load(Relaxed);
        PEAK.store(base, Relaxed);
        RUNNING.store(index << 48 | case, Relaxed);
        let t = Instant::now();
        to_worker.send(dir.clone()).unwrap();
        let outcome = match results.recv_timeout(CASE_TIME) {
            Ok(outcome) => outcome,
            Err(_) => panic!("{name} did not finish within {CASE_TIME:?}"),
        };
        slowest = slowest.max(t.elapsed());
        let used = PEAK.load(Relaxed).saturating_sub(base);
        if verbose {
            eprintln!("{name}: {outcome:?}");
        }
        match outcome {
            Ok(result) => {
                loaded += result.is_ok() as usize;
                if used > CASE_MEMORY {
                    failures.push(format!("{name} allocated {} MiB", used >> 20));
                }
            }
            Err(message) => failures.push(format!("{name} panicked: {message}")),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    let _ = std::fs::remove_dir_all(&root);
    eprintln!(
        "{family}: {loaded} cases loaded, the rest refused, in {:.1}s (slowest {:.2}s)",
        started.elapsed().as_secs_f64(),
        slowest.as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} of the cases failed (rerun one with VIBEE_FUZZ_CASE=n):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// A short greedy and a short sampled generation on a loaded engine: corrupt weights may
/// give nonsense, never a panic.
fn generate(mut engine: vibee_core::Engine) -> anyhow::Result<()> {
    let vocab = engine.model.config.vocab_size as u32;
    let prompt = vec![0, 1 % vocab, 2 % vocab];
    for temperature in [0.0, 0.8] {
        let params = SamplingParams {
            temperature,
            max_tokens: 2,
            ignore_eos: true,
            ..SamplingParams::default()
        };
        runner::generate(&mut engine.app, prompt.clone(), params)?;
    }
    Ok(())
}

/// The fixture directories with `file`, except those named in `skip`.
fn fixture_dirs_with(file: &str, skip: &[&str]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(fixture(""))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|d| d.join(file).is_file())
        .filter(|d| !skip.iter().any(|s| d.ends_with(s)))
        .collect();
    dirs.sort();
    dirs
}

#[test]
fn gguf_files() {
    let seeds = fixture_dirs_with("model.gguf", &[])
        .into_iter()
        .map(|d| seed_dir(&d, &["reference.json"]))
        .chain([seed_dir(&fixture("gguf"), &[])])
        .collect();
    fn mutate(rng: &mut StdRng, files: &mut Files, donor: &[u8]) -> String {
        let (_, data) = &mut files[0];
        let (fields, header_end) = gguf_fields(data);
        if !fields.is_empty() && rng.random_bool(0.5) {
            let (at, width) = fields[rng.random_range(0..fields.len())];
            let mut old = [0u8; 8];
            old[..width].copy_from_slice(&data[at..at + width]);
            // A huge value, or one just off (an off-by-one count, a neighbouring type id).
            let value = match rng.random_bool(0.5) {
                true => HUGE[rng.random_range(0..HUGE.len())],
                false => u64::from_le_bytes(old).wrapping_add_signed(rng.random_range(-3..=3)),
            };
            write_int(data, at, width, value);
            return format!("set the {width}-byte field at {at} to {value}");
        }
        mutate_bytes(rng, data, 0..header_end.max(8), donor)
    }
    fn check(dir: &Path) -> anyhow::Result<()> {
        let path = std::fs::read_dir(dir)?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .find(|p| p.extension().is_some_and(|e| e == "gguf"))
            .expect("every seed has a .gguf file");
        let file = Gguf::open(&path)?;
        if let Ok(Some(tokenizer)) = Tokenizer::from_gguf(&file) {
            let ids = tokenizer.encode("Hello world, 123 ünïcode")?;
            tokenizer.decode(&ids)?;
        }
        drop(file);
        generate(load(&path, "auto")?)
    }
    fuzz("gguf", seeds, mutate, check);
}

#[test]
fn safetensors_headers() {
    let seeds = [
        "llama-gqa",
        "llama-bf16",
        "llama-sharded",
        "gpt2",
        "mixtral",
    ]
    .map(|name| seed_dir(&fixture(name), &["reference.json"]))
    .into();
    fn mutate(rng: &mut StdRng, files: &mut Files, donor: &[u8]) -> String {
        let weights: Vec<String> = (files.iter())
            .filter(|(n, _)| n.ends_with(".safetensors") || n.ends_with(".index.json"))
            .map(|(n, _)| n.clone())
            .collect();
        let name = &weights[rng.random_range(0..weights.len())];
        if name.ends_with(".json") {
            return mutate_json_file(rng, files, name, donor);
        }
        mutate_safetensors(rng, files, name, donor)
    }
    fn check(dir: &Path) -> anyhow::Result<()> {
        let weights = Weights::open(dir)?;
        for name in weights.names() {
            let shape = weights.shape(name)?.to_vec();
            if let Ok(weight) = weights.get(name, &shape) {
                weight.to_f32_vec();
            }
            for dtype in ["I32", "U8", "I64"] {
                let _ = weights.raw(name, dtype);
            }
        }
        drop(weights);
        generate(load(dir, "auto")?)
    }
    fuzz("safetensors", seeds, mutate, check);
}

#[test]
fn tokenizer_json() {
    let seeds = fixture_dirs_with("tokenizer.json", &[])
        .into_iter()
        .map(|d| {
            let mut seed = seed_dir(&d, &[]);
            seed.files.retain(|(n, _)| n == "tokenizer.json");
            seed
        })
        .collect();
    fn mutate(rng: &mut StdRng, files: &mut Files, donor: &[u8]) -> String {
        mutate_json_file(rng, files, "tokenizer.json", donor)
    }
    fn check(dir: &Path) -> anyhow::Result<()> {
        let tokenizer = Tokenizer::from_dir(dir, Some(1))?;
        let ids = tokenizer.encode("Hello world, 123 ünïcode\n\t<0x0A> ")?;
        for id in &ids {
            tokenizer.is_byte(*id);
        }
        tokenizer.decode(&ids)?;
        let _ = tokenizer.decode(&[u32::MAX, 0, 1 << 31]);
        Ok(())
    }
    fuzz("tokenizer", seeds, mutate, check);
}

/// Every config.json of the fixtures, and the real models' configs.
fn config_seeds() -> Vec<Seed> {
    let mut seeds: Vec<Seed> = fixture_dirs_with("config.json", &[])
        .into_iter()
        .map(|d| Seed {
            label: d.file_name().unwrap().to_string_lossy().into_owned(),
            files: vec![(
                "config.json".into(),
                std::fs::read(d.join("config.json")).unwrap(),
            )],
        })
        .collect();
    for entry in std::fs::read_dir(fixture("configs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            seeds.push(Seed {
                label: path.file_name().unwrap().to_string_lossy().into_owned(),
                files: vec![("config.json".into(), std::fs::read(&path).unwrap())],
            });
        }
    }
    seeds
}

fn mutate_config(rng: &mut StdRng, files: &mut Files, donor: &[u8]) -> String {
    mutate_json_file(rng, files, "config.json", donor)
}

#[test]
fn config_json() {
    fn check(dir: &Path) -> anyhow::Result<()> {
        let text = std::fs::read_to_string(dir.join("config.json"))?;
        let config = ModelConfig::from_json(&text)?;
        engine::expand_auto(&["auto".to_string()], &config);
        Ok(())
    }
    fuzz("config", config_seeds(), mutate_config, check);
}

#[test]
fn config_json_against_the_checkpoint_weights() {
    let seeds = fixture_dirs_with("model.safetensors", &[])
        .iter()
        .map(|d| seed_dir(d, &["reference.json", "generation_config.json"]))
        .collect();
    fn check(dir: &Path) -> anyhow::Result<()> {
        generate(load(dir, "auto")?)
    }
    fuzz("config-with-weights", seeds, mutate_config, check);
}

#[test]
fn quantized_checkpoints() {
    let seeds = fixture_dirs_with("config.json", &[])
        .iter()
        .filter(|d| {
            let name = d.file_name().unwrap().to_string_lossy();
            ["-awq", "-gptq", "-hqq-stored"]
                .iter()
                .any(|m| name.contains(m))
        })
        .map(|d| seed_dir(d, &["reference.json"]))
        .collect();
    fn mutate(rng: &mut StdRng, files: &mut Files, donor: &[u8]) -> String {
        if rng.random_bool(0.2) {
            return mutate_json_file(rng, files, "config.json", donor);
        }
        if rng.random_bool(0.25) {
            return mutate_safetensors(rng, files, "model.safetensors", donor);
        }
        let data = file(files, "model.safetensors");
        let header_len = u64::from_le_bytes(data[..8].try_into().unwrap()) as usize;
        let Ok(Value::Object(header)) = serde_json::from_slice(&data[8..8 + header_len]) else {
            unreachable!("the fixtures are valid")
        };
        let mut names: Vec<&String> = header.keys().filter(|k| *k != "__metadata__").collect();
        names.sort();
        let name = names[rng.random_range(0..names.len())];
        let range = header[name]["data_offsets"].as_array().unwrap();
        let (start, end) = (range[0].as_u64().unwrap(), range[1].as_u64().unwrap());
        let region = 8 + header_len + start as usize..8 + header_len + end as usize;
        let dtype = header[name]["dtype"].as_str().unwrap();
        // Float tensors (the scales and zero points) also get NaN and infinities.
        if matches!(dtype, "F16" | "BF16" | "F32") && region.len() >= 2 && rng.random_bool(0.5) {
            // NaN, +∞ and −∞, little-endian.
            let specials: [&[u8]; 3] = match dtype {
                "F16" => [&[0x00, 0x7e], &[0x00, 0x7c], &[0x00, 0xfc]],
                "BF16" => [&[0xc0, 0x7f], &[0x80, 0x7f], &[0x80, 0xff]],
                _ => [
                    &[0, 0, 0xc0, 0x7f],
                    &[0, 0, 0x80, 0x7f],
                    &[0, 0, 0x80, 0xff],
                ],
            };
            let special = specials[rng.random_range(0..3)];
            let width = special.len();
            let at = region.start + rng.random_range(0..region.len() / width) * width;
            data[at..at + width].copy_from_slice(special);
            return format!(
                "set element {} of {name} to {special:02x?}",
                (at - region.start) / width
            );
        }
        let what = mutate_bytes(rng, data, region, donor);
        format!("{name}: {what}")
    }
    fn check(dir: &Path) -> anyhow::Result<()> {
        generate(load(dir, "auto")?)
    }
    fuzz("quantized", seeds, mutate, check);
}
