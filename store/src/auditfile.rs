//! The audit log as append-only, hash-chained JSON lines: `data_dir/audit/<first seq, 20 digits>.jsonl`.
//!
//! The log is written in group-committed batches and only ever appended to, so it needs no B-tree: a batch
//! is one `write` and one `fdatasync` (plus an `fsync` of the directory when it starts a new segment), and
//! memory stays constant in the log's size. Only a sparse index is kept: per segment its first seq and,
//! once known, its latest timestamp, so `since` reads skip whole segments; `newest` reads walk the
//! segments backwards from the end.
//!
//! A line is `{"hash":"<64 hex>","event":<canonical JSON>}` where the canonical JSON is kept byte for byte
//! as it was hashed (see `store::seal`); the line is still plain JSON for `jq` and friends. An event's seq is
//! its position: the segment's first seq plus its line number, so a removed or duplicated line breaks the
//! chain where it sits.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
#[cfg(test)]
use std::sync::atomic::{AtomicBool, Ordering};

use botcreds_proto::audit::AuditEvent;

use super::{
    AuditFilter, ChainHead, ChainReport, ChainWalk, GENESIS_HASH, HASH_HEX_LEN, StoreError,
    decode_event, lock, normalize_since, split_record,
};

/// Start a new segment once the current one would grow past this.
pub(super) const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;

const LINE_PREFIX: &[u8] = br#"{"hash":""#;
const LINE_MIDDLE: &[u8] = br#"","event":"#;
const LINE_SUFFIX: &[u8] = b"}\n";
const SEGMENT_SUFFIX: &str = ".jsonl";
const SEGMENT_DIGITS: usize = 20;
/// The largest batch buffer kept between batches (a burst may grow it further, once).
const KEPT_BUFFER_BYTES: usize = 1024 * 1024;

pub(super) struct AuditFile {
    dir: PathBuf,
    segment_bytes: u64,
    /// Held across a whole append so that seqs are assigned in commit order.
    writer: Mutex<Writer>,
    /// What readers may see: only acknowledged batches. Updated after each durable append.
    index: Mutex<Index>,
    /// Tests make the next flush fail after the batch was written, to exercise the undo.
    #[cfg(test)]
    fail_next_sync: AtomicBool,
}

struct Writer {
    /// The active (last) segment.
    file: File,
    first_seq: u64,
    /// Bytes of the active segment that belong to acknowledged batches.
    len: u64,
    /// A failed batch may have left bytes past `len` that could not be truncated yet.
    dirty: bool,
    /// Whether the active segment's directory entry is known to be durable.
    dir_synced: bool,
    head: ChainHead,
    /// The last batch's line buffer, reused so a batch costs no allocation for its lines.
    buffer: Vec<u8>,
}

#[derive(Clone, Debug)]
struct Segment {
    first_seq: u64,
    /// The latest timestamp in the segment (timestamps are only roughly in seq order), once known. Sealed
    /// segments found at open learn it on their first full scan.
    max_timestamp: Option<String>,
}

#[derive(Clone, Debug)]
struct Index {
    segments: Vec<Segment>,
    /// Acknowledged bytes of the last segment; earlier segments are read to their end.
    active_len: u64,
    head: ChainHead,
}

impl AuditFile {
    /// Open (creating it 0700 if missing) the log directory, truncate a torn trailing line left by a crash
    /// mid-write (it was never acknowledged) and find the chain's head.
    pub(super) fn open(dir: &Path, segment_bytes: u64) -> Result<AuditFile, StoreError> {
        let io_error = |path: &Path| {
            let path = path.to_owned();
            move |source| StoreError::AuditFile { path, source }
        };
        ensure_log_dir(dir)?;
        let mut firsts = Vec::new();
        for entry in fs::read_dir(dir).map_err(io_error(dir))? {
            let entry = entry.map_err(io_error(dir))?;
            let name = entry.file_name();
            let Some(first_seq) = name.to_str().and_then(parse_segment_name) else {
                tracing::warn!(dir = %dir.display(), file = ?name, "ignoring a file that is not an audit segment");
                continue;
            };
            let path = entry.path();
            let meta = fs::symlink_metadata(&path).map_err(io_error(&path))?;
            if !meta.file_type().is_file() {
                return Err(StoreError::AuditFile {
                    path,
                    source: io::Error::new(
                        io::ErrorKind::InvalidData,
                        "audit segment is not a regular file (symlinks are refused)",
                    ),
                });
            }
            firsts.push((first_seq, meta.len()));
        }
        firsts.sort_unstable();
        // Find the active segment and the head. A segment started just before a crash may hold nothing
        // acknowledged (empty, or only a torn line): drop it, so the head is found in the one before.
        let (file, first_seq, scan) = loop {
            let (first_seq, create) = match firsts.last() {
                Some(&(first_seq, _)) => (first_seq, false),
                None => (1, true),
            };
            let path = segment_path(dir, first_seq);
            let file = open_segment(&path, create)?;
            let scan = scan_active(&file, &path, first_seq)?;
            if scan.len == 0 && firsts.len() > 1 {
                tracing::warn!(file = %path.display(), "removing an audit segment with no complete line");
                drop(file);
                fs::remove_file(&path).map_err(io_error(&path))?;
                sync_dir(dir)?;
                firsts.pop();
                continue;
            }
            if scan.torn > 0 {
                tracing::warn!(
                    file = %path.display(),
                    bytes = scan.torn,
                    "truncating a torn trailing audit line (an unacknowledged write cut short)"
                );
                file.set_len(scan.len).map_err(io_error(&path))?;
                file.sync_data().map_err(io_error(&path))?;
            }
            break (file, first_seq, scan);
        };
        // A segment created here has a directory entry that is not durable yet: the first append syncs it.
        let dir_synced = !firsts.is_empty();
        let mut segments: Vec<Segment> = firsts
            .iter()
            .map(|&(first_seq, _)| Segment {
                first_seq,
                max_timestamp: None,
            })
            .collect();
        match segments.last_mut() {
            Some(last) => last.max_timestamp = scan.max_timestamp,
            None => segments.push(Segment {
                first_seq,
                max_timestamp: None,
            }),
        }
        let head = scan.head;
        Ok(AuditFile {
            dir: dir.to_owned(),
            segment_bytes,
            writer: Mutex::new(Writer {
                file,
                first_seq,
                len: scan.len,
                dirty: false,
                dir_synced,
                head: head.clone(),
                buffer: Vec::new(),
            }),
            index: Mutex::new(Index {
                segments,
                active_len: scan.len,
                head,
            }),
            #[cfg(test)]
            fail_next_sync: AtomicBool::new(false),
        })
    }

    /// The last acknowledged event.
    pub(super) fn head(&self) -> ChainHead {
        lock(&self.index).head.clone()
    }

    /// Seal and append events as one durable batch (the `Store::append_audit` contract).
    pub(super) fn append(&self, events: &mut [AuditEvent]) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let mut writer = lock(&self.writer);
        let mut next = writer.head.clone();
        let mut lines = std::mem::take(&mut writer.buffer);
        lines.clear();
        let mut max_timestamp: Option<&str> = None;
        for event in events.iter_mut() {
            if let Err(e) = seal_line(event, &mut next, &mut lines) {
                writer.buffer = lines;
                return Err(e);
            }
        }
        for event in events.iter() {
            if max_timestamp.is_none_or(|max| event.timestamp.as_str() > max) {
                max_timestamp = Some(&event.timestamp);
            }
        }
        let written = self.write_batch(&mut writer, &lines, next, max_timestamp);
        // Keep the batch buffer for the next batch unless an unusually large batch grew it.
        if lines.capacity() <= KEPT_BUFFER_BYTES {
            writer.buffer = lines;
        }
        written
    }

    /// Append already sealed records (hash ‖ canonical JSON) that continue the chain, as one durable
    /// batch. The caller has checked that they chain onto the head; used to migrate an older log.
    pub(super) fn append_records(
        &self,
        records: &[Vec<u8>],
        new_head: ChainHead,
        max_timestamp: Option<&str>,
    ) -> Result<(), StoreError> {
        let mut writer = lock(&self.writer);
        if new_head.seq != writer.head.seq + records.len() as u64 {
            return Err(StoreError::Corrupt(format!(
                "audit records to append end at seq {} but the log's head is {}",
                new_head.seq, writer.head.seq
            )));
        }
        let mut lines = Vec::new();
        for record in records {
            push_line(&mut lines, record);
        }
        self.write_batch(&mut writer, &lines, new_head, max_timestamp)
    }

    /// Write, flush, and only then publish a batch; on any error take the bytes back out so that the next
    /// batch reuses the seqs.
    fn write_batch(
        &self,
        writer: &mut Writer,
        lines: &[u8],
        new_head: ChainHead,
        max_timestamp: Option<&str>,
    ) -> Result<(), StoreError> {
        if lines.is_empty() {
            return Ok(());
        }
        if writer.dirty {
            writer
                .file
                .set_len(writer.len)
                .map_err(|source| self.active_error(writer, source))?;
            writer.dirty = false;
        }
        if writer.len > 0 && writer.len + lines.len() as u64 > self.segment_bytes {
            self.rotate(writer)?;
        }
        match self.write_and_sync(writer, lines) {
            Ok(()) => {}
            Err(source) => {
                // Nobody will be told these events were recorded: cut them off again. If even that fails,
                // remember it and retry before the next write, which must start at `len`.
                match writer.file.set_len(writer.len) {
                    Ok(()) => {
                        if let Err(e) = writer.file.sync_data() {
                            tracing::error!(error = %e, "could not flush the undo of an audit batch");
                        }
                    }
                    Err(undo) => {
                        writer.dirty = true;
                        tracing::error!(error = %undo, "could not truncate an unflushed audit batch");
                    }
                }
                return Err(self.active_error(writer, source));
            }
        }
        writer.len += lines.len() as u64;
        writer.head = new_head.clone();
        let mut index = lock(&self.index);
        index.active_len = writer.len;
        index.head = new_head;
        if let (Some(last), Some(ts)) = (index.segments.last_mut(), max_timestamp)
            && last.max_timestamp.as_deref().is_none_or(|max| ts > max)
        {
            last.max_timestamp = Some(ts.to_owned());
        }
        Ok(())
    }

    fn write_and_sync(&self, writer: &mut Writer, lines: &[u8]) -> io::Result<()> {
        writer.file.write_all_at(lines, writer.len)?;
        #[cfg(test)]
        if self.fail_next_sync.swap(false, Ordering::SeqCst) {
            return Err(io::Error::other("injected flush failure"));
        }
        writer.file.sync_data()?;
        if !writer.dir_synced {
            sync_dir_io(&self.dir)?;
            writer.dir_synced = true;
        }
        Ok(())
    }

    /// Start the next segment, named after the next seq. The old one is complete and flushed.
    fn rotate(&self, writer: &mut Writer) -> Result<(), StoreError> {
        let first_seq = writer.head.seq + 1;
        let path = segment_path(&self.dir, first_seq);
        let file = open_segment(&path, true)?;
        writer.file = file;
        writer.first_seq = first_seq;
        writer.len = 0;
        writer.dir_synced = false;
        let mut index = lock(&self.index);
        index.segments.push(Segment {
            first_seq,
            max_timestamp: None,
        });
        index.active_len = 0;
        Ok(())
    }

    fn active_error(&self, writer: &Writer, source: io::Error) -> StoreError {
        StoreError::AuditFile {
            path: segment_path(&self.dir, writer.first_seq),
            source,
        }
    }

    /// `Store::read_audit`: scan the segments that can hold matching events, in seq order.
    pub(super) fn read(&self, filter: &AuditFilter) -> Result<Vec<AuditEvent>, StoreError> {
        let since = filter.since.as_deref().map(normalize_since).transpose()?;
        let mut out = Vec::new();
        if filter.limit == 0 {
            return Ok(out);
        }
        let index = lock(&self.index).clone();
        if filter.newest {
            let events = NewestFirst {
                log: self,
                index: &index,
                segment: index.segments.len(),
                lines: None,
                record: Vec::new(),
            };
            return super::newest_matching(filter, since.as_deref(), events);
        }
        let last = index.segments.len().saturating_sub(1);
        for (i, segment) in index.segments.iter().enumerate() {
            if let (Some(since), Some(max)) = (since.as_deref(), segment.max_timestamp.as_deref())
                && max < since
            {
                continue;
            }
            let limit = (i == last).then_some(index.active_len);
            let mut lines = self.lines(segment.first_seq, limit)?;
            let mut max_timestamp: Option<String> = None;
            let mut record = Vec::new();
            while let Some(seq) = lines.next_line()? {
                if seq > index.head.seq {
                    break;
                }
                record_of_line(lines.line(), &mut record);
                let event = decode_event(seq, &record)?;
                if max_timestamp
                    .as_deref()
                    .is_none_or(|max| event.timestamp.as_str() > max)
                {
                    max_timestamp = Some(event.timestamp.clone());
                }
                if filter.matches(&event, since.as_deref()) {
                    out.push(event);
                    if out.len() >= filter.limit {
                        return Ok(out);
                    }
                }
            }
            if i != last && segment.max_timestamp.is_none() {
                // A sealed segment scanned whole: remember its latest timestamp for the next `since`.
                let mut index = lock(&self.index);
                if let Some(s) = index
                    .segments
                    .iter_mut()
                    .find(|s| s.first_seq == segment.first_seq)
                {
                    s.max_timestamp = max_timestamp;
                }
            }
        }
        Ok(out)
    }

    /// `Store::verify_audit_chain`: walk every line up to the head as of now.
    pub(super) fn verify(&self) -> Result<ChainReport, StoreError> {
        let index = lock(&self.index).clone();
        let mut walk = ChainWalk::new();
        let last = index.segments.len().saturating_sub(1);
        let mut record = Vec::new();
        'segments: for (i, segment) in index.segments.iter().enumerate() {
            let limit = (i == last).then_some(index.active_len);
            let mut lines = self.lines(segment.first_seq, limit)?;
            while let Some(seq) = lines.next_line()? {
                if seq > index.head.seq {
                    break 'segments;
                }
                record_of_line(lines.line(), &mut record);
                walk.step(seq, &record);
            }
        }
        Ok(walk.finish(&index.head))
    }

    fn lines(&self, first_seq: u64, limit: Option<u64>) -> Result<Lines, StoreError> {
        let path = segment_path(&self.dir, first_seq);
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(|source| StoreError::AuditFile {
                path: path.clone(),
                source,
            })?;
        Ok(Lines {
            reader: BufReader::with_capacity(64 * 1024, file.take(limit.unwrap_or(u64::MAX))),
            path,
            next_seq: first_seq,
            line: Vec::new(),
        })
    }

    #[cfg(test)]
    pub(super) fn fail_next_sync(&self) {
        self.fail_next_sync.store(true, Ordering::SeqCst);
    }
}

/// The log's events newest first, for reads that stop after the newest few: segments from the last, each
/// read backwards in blocks, so the cost is what is read, not the log's size.
struct NewestFirst<'a> {
    log: &'a AuditFile,
    index: &'a Index,
    /// The segment being read is `segment`; it counts down.
    segment: usize,
    lines: Option<BackLines>,
    record: Vec<u8>,
}

impl Iterator for NewestFirst<'_> {
    type Item = Result<AuditEvent, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let lines = match &mut self.lines {
                Some(lines) => lines,
                None => {
                    self.segment = self.segment.checked_sub(1)?;
                    let segments = &self.index.segments;
                    let first_seq = segments[self.segment].first_seq;
                    let (last_seq, len) = match segments.get(self.segment + 1) {
                        Some(next) => (next.first_seq.saturating_sub(1), None),
                        None => (self.index.head.seq, Some(self.index.active_len)),
                    };
                    match BackLines::open(&segment_path(&self.log.dir, first_seq), len, last_seq) {
                        Ok(lines) => self.lines.insert(lines),
                        Err(e) => {
                            self.segment = 0;
                            return Some(Err(e));
                        }
                    }
                }
            };
            match lines.prev_line() {
                Ok(Some((seq, line))) => {
                    record_of_line(&line, &mut self.record);
                    return Some(decode_event(seq, &self.record));
                }
                Ok(None) => self.lines = None,
                Err(e) => {
                    self.segment = 0;
                    self.lines = None;
                    return Some(Err(e));
                }
            }
        }
    }
}

/// The lines of one segment from its end backwards, numbered down from its last seq.
struct BackLines {
    file: File,
    path: PathBuf,
    /// Where the bytes in `pending` start in the file.
    pos: u64,
    /// Bytes read but not yet returned: complete lines, the first possibly only partly read.
    pending: Vec<u8>,
    next_seq: u64,
}

impl BackLines {
    const BLOCK: u64 = 64 * 1024;

    fn open(path: &Path, len: Option<u64>, last_seq: u64) -> Result<BackLines, StoreError> {
        let io_error = |source| StoreError::AuditFile {
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(io_error)?;
        let pos = match len {
            Some(len) => len,
            None => file.metadata().map_err(io_error)?.len(),
        };
        Ok(BackLines {
            file,
            path: path.to_owned(),
            pos,
            pending: Vec::new(),
            next_seq: last_seq,
        })
    }

    /// The line before the ones returned so far (with its newline), and its seq; None at the start.
    fn prev_line(&mut self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        loop {
            // The last line's own newline does not end the line before it.
            let search = self.pending.len().saturating_sub(1);
            if let Some(at) = self.pending[..search].iter().rposition(|&b| b == b'\n') {
                let line = self.pending.split_off(at + 1);
                return Ok(Some(self.number(line)));
            }
            if self.pos == 0 {
                if self.pending.is_empty() {
                    return Ok(None);
                }
                let line = std::mem::take(&mut self.pending);
                return Ok(Some(self.number(line)));
            }
            let start = self.pos.saturating_sub(Self::BLOCK);
            let mut block = vec![0; usize::try_from(self.pos - start).unwrap_or(0)];
            self.file
                .read_exact_at(&mut block, start)
                .map_err(|source| StoreError::AuditFile {
                    path: self.path.clone(),
                    source,
                })?;
            block.extend_from_slice(&self.pending);
            self.pending = block;
            self.pos = start;
        }
    }

    fn number(&mut self, line: Vec<u8>) -> (u64, Vec<u8>) {
        let seq = self.next_seq;
        self.next_seq = self.next_seq.saturating_sub(1);
        (seq, line)
    }
}

/// The lines of one segment, numbered by seq.
struct Lines {
    reader: BufReader<io::Take<File>>,
    path: PathBuf,
    next_seq: u64,
    line: Vec<u8>,
}

impl Lines {
    /// Read the next line; its seq, or None at the end.
    fn next_line(&mut self) -> Result<Option<u64>, StoreError> {
        self.line.clear();
        let read = self
            .reader
            .read_until(b'\n', &mut self.line)
            .map_err(|source| StoreError::AuditFile {
                path: self.path.clone(),
                source,
            })?;
        if read == 0 {
            return Ok(None);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        Ok(Some(seq))
    }

    fn line(&self) -> &[u8] {
        &self.line
    }
}

/// What the scan of the active segment at open found.
struct ActiveScan {
    /// Bytes up to the end of the last complete line.
    len: u64,
    /// Bytes after it: a torn write.
    torn: u64,
    head: ChainHead,
    max_timestamp: Option<String>,
}

fn scan_active(file: &File, path: &Path, first_seq: u64) -> Result<ActiveScan, StoreError> {
    let io_error = |source| StoreError::AuditFile {
        path: path.to_owned(),
        source,
    };
    let mut reader = BufReader::with_capacity(64 * 1024, file);
    let mut line = Vec::new();
    let mut len = 0u64;
    let mut torn = 0u64;
    let mut lines = 0u64;
    let mut last_hash = None;
    let mut max_timestamp: Option<String> = None;
    let mut record = Vec::new();
    loop {
        line.clear();
        let read = reader.read_until(b'\n', &mut line).map_err(io_error)?;
        if read == 0 {
            break;
        }
        if line.last() != Some(&b'\n') {
            torn = read as u64;
            break;
        }
        len += read as u64;
        lines += 1;
        // A line that does not parse stays where it is for the verifier to report; the chain continues
        // from whatever hash it claims (none: the next link breaks too).
        record_of_line(&line, &mut record);
        let seq = first_seq + lines - 1;
        last_hash = split_record(seq, &record).ok().map(|(h, _)| h.to_owned());
        if let Ok(event) = decode_event(seq, &record)
            && max_timestamp
                .as_deref()
                .is_none_or(|max| event.timestamp.as_str() > max)
        {
            max_timestamp = Some(event.timestamp);
        }
    }
    let head = match lines {
        0 if first_seq == 1 => ChainHead::genesis(),
        0 => ChainHead {
            seq: first_seq - 1,
            hash: GENESIS_HASH.to_owned(),
        },
        n => ChainHead {
            seq: first_seq + n - 1,
            hash: last_hash.unwrap_or_default(),
        },
    };
    Ok(ActiveScan {
        len,
        torn,
        head,
        max_timestamp,
    })
}

/// Give `event` its place in the chain (as `store::seal` does) and append its line to `out`, serialising the
/// canonical JSON straight into the batch buffer and hashing it there: no per-event allocation or copy.
fn seal_line(
    event: &mut AuditEvent,
    head: &mut ChainHead,
    out: &mut Vec<u8>,
) -> Result<(), StoreError> {
    let start = out.len();
    event.seq = head.seq + 1;
    event.hash.clear();
    out.extend_from_slice(LINE_PREFIX);
    let hash_at = out.len();
    out.resize(hash_at + HASH_HEX_LEN, b'0');
    out.extend_from_slice(LINE_MIDDLE);
    let canonical_at = out.len();
    if let Err(e) = serde_json::to_writer(&mut *out, &*event) {
        out.truncate(start);
        return Err(StoreError::Encode(e));
    }
    let digest = {
        use sha2::Digest;
        let mut hasher = sha2::Sha256::new();
        hasher.update(head.hash.as_bytes());
        hasher.update(&out[canonical_at..]);
        hasher.finalize()
    };
    let hex = &mut out[hash_at..hash_at + HASH_HEX_LEN];
    // 32 bytes always fit 64 hex digits.
    hex::encode_to_slice(digest, hex).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let hash = std::str::from_utf8(hex).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    head.seq += 1;
    head.hash.clear();
    head.hash.push_str(hash);
    event.hash.push_str(hash);
    out.extend_from_slice(LINE_SUFFIX);
    Ok(())
}

/// Append `{"hash":"…","event":…}\n` for a sealed record (hash ‖ canonical JSON).
pub(super) fn push_line(out: &mut Vec<u8>, record: &[u8]) {
    let (hash, canonical) = record.split_at(HASH_HEX_LEN.min(record.len()));
    out.extend_from_slice(LINE_PREFIX);
    out.extend_from_slice(hash);
    out.extend_from_slice(LINE_MIDDLE);
    out.extend_from_slice(canonical);
    out.extend_from_slice(LINE_SUFFIX);
}

/// Turn a stored line back into the sealed record (hash ‖ canonical JSON) in `out`. A line that is not in
/// the log's form yields an empty record, which every decoder and the chain walk reject at its seq.
fn record_of_line(line: &[u8], out: &mut Vec<u8>) {
    out.clear();
    let framed = line
        .strip_prefix(LINE_PREFIX)
        .filter(|rest| rest.len() >= HASH_HEX_LEN)
        .map(|rest| rest.split_at(HASH_HEX_LEN))
        .and_then(|(hash, rest)| {
            let canonical = rest.strip_prefix(LINE_MIDDLE)?.strip_suffix(LINE_SUFFIX)?;
            Some((hash, canonical))
        });
    if let Some((hash, canonical)) = framed {
        out.extend_from_slice(hash);
        out.extend_from_slice(canonical);
    }
}

fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!(
        "{first_seq:0width$}{SEGMENT_SUFFIX}",
        width = SEGMENT_DIGITS
    ))
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != SEGMENT_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|&seq| seq > 0)
}

/// Open a segment for writing without following a symlink; `create` makes a new one (0600) and refuses
/// one that already exists.
fn open_segment(path: &Path, create: bool) -> Result<File, StoreError> {
    let mut options = OpenOptions::new();
    options
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
    if create {
        options.create_new(true);
    }
    options.open(path).map_err(|source| StoreError::AuditFile {
        path: path.to_owned(),
        source,
    })
}

/// The log directory: created 0700 if missing; an existing one must be a real directory, not a symlink.
fn ensure_log_dir(dir: &Path) -> Result<(), StoreError> {
    let dir_error = |source| StoreError::AuditFile {
        path: dir.to_owned(),
        source,
    };
    match fs::symlink_metadata(dir) {
        Ok(meta) if meta.file_type().is_dir() => Ok(()),
        Ok(_) => Err(dir_error(io::Error::new(
            io::ErrorKind::NotADirectory,
            "exists and is not a directory (symlinks are refused)",
        ))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::DirBuilder::new()
                .mode(0o700)
                .create(dir)
                .map_err(dir_error)?;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(dir_error)?;
            if let Some(parent) = dir.parent() {
                sync_dir(parent)?;
            }
            Ok(())
        }
        Err(e) => Err(dir_error(e)),
    }
}

fn sync_dir_io(dir: &Path) -> io::Result<()> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dir)?
        .sync_all()
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    sync_dir_io(dir).map_err(|source| StoreError::AuditFile {
        path: dir.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests;
