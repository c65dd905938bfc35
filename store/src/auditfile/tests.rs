//! Tests of the file audit log beyond the `Store` conformance suite: crashes, corruption, failed writes,
//! segment rotation and symlinks.

use std::os::unix::fs::symlink;

use botcreds_proto::audit::AuditEventKind;

use super::*;
use crate::tests as conformance;

fn issued(second: u64) -> AuditEvent {
    conformance::event(
        AuditEventKind::CredentialIssued,
        &format!("2026-02-17T14:{:02}:{:02}.000Z", second / 60, second % 60),
        Some("machina-bot"),
    )
}

fn open(dir: &Path) -> AuditFile {
    AuditFile::open(dir, SEGMENT_BYTES).unwrap()
}

fn append(log: &AuditFile, seconds: std::ops::Range<u64>) -> Vec<AuditEvent> {
    let mut events: Vec<AuditEvent> = seconds.map(issued).collect();
    log.append(&mut events).unwrap();
    events
}

fn seqs(events: &[AuditEvent]) -> Vec<u64> {
    events.iter().map(|e| e.seq).collect()
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

fn intact(events: u64) -> ChainReport {
    ChainReport {
        events,
        first_broken: None,
    }
}

#[test]
fn conformance_holds_when_every_batch_starts_a_segment() {
    // One byte per segment: every batch after the first rotates, so reads and the chain cross segments.
    let dir = tempfile::tempdir().unwrap();
    let store = crate::SledStore::open_with_segment_bytes(&dir.path().join("a"), 1);
    conformance::appends_are_gap_free_and_chained(&store);
    let store = crate::SledStore::open_with_segment_bytes(&dir.path().join("b"), 1);
    conformance::filters_select_and_limit(&store);
}

#[test]
fn torn_tail_is_truncated_at_open_and_the_chain_still_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("audit");
    let first = append(&open(&dir), 0..3);
    let [segment] = segments(&dir).try_into().unwrap();
    let whole = fs::read(&segment).unwrap();
    // kill -9 in the middle of writing the next batch: half a line.
    let line = whole.split(|&b| b == b'\n').next().unwrap();
    let mut torn = whole.clone();
    torn.extend_from_slice(&line[..line.len() / 2]);
    fs::write(&segment, &torn).unwrap();

    let log = open(&dir);
    assert_eq!(fs::read(&segment).unwrap(), whole);
    assert_eq!(log.verify().unwrap(), intact(3));
    assert_eq!(log.read(&AuditFilter::default()).unwrap(), first);
    assert_eq!(seqs(&append(&log, 3..4)), [4]);
    assert_eq!(log.verify().unwrap(), intact(4));
}

#[test]
fn corrupted_middle_line_is_reported_by_verify_at_its_seq() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("audit");
    append(&open(&dir), 0..5);
    let [segment] = segments(&dir).try_into().unwrap();
    let text = fs::read_to_string(&segment).unwrap();
    for garbage in ["not json at all", "{\"hash\":\"00\"}", ""] {
        let mut lines: Vec<&str> = text.lines().collect();
        lines[2] = garbage;
        fs::write(&segment, lines.join("\n") + "\n").unwrap();
        let log = open(&dir);
        assert_eq!(
            log.verify().unwrap(),
            ChainReport {
                events: 5,
                first_broken: Some(3)
            },
            "{garbage:?}"
        );
        // Never silently dropped: reading all of it says the record is corrupt.
        assert!(
            matches!(
                log.read(&AuditFilter::default()),
                Err(StoreError::Corrupt(_))
            ),
            "{garbage:?}"
        );
    }
}

#[test]
fn failed_append_leaves_the_next_append_reusing_the_seqs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("audit");
    let log = open(&dir);
    append(&log, 0..2);
    let [segment] = segments(&dir).try_into().unwrap();
    let before = fs::read(&segment).unwrap();

    log.fail_next_sync();
    let mut lost: Vec<AuditEvent> = (2..4).map(issued).collect();
    let err = log.append(&mut lost).unwrap_err();
    assert!(matches!(err, StoreError::AuditFile { .. }), "{err:?}");
    // The written bytes were taken back out and nothing of the batch is visible.
    assert_eq!(fs::read(&segment).unwrap(), before);
    assert_eq!(log.read(&AuditFilter::default()).unwrap().len(), 2);
    assert_eq!(log.head().seq, 2);

    let again = append(&log, 4..6);
    assert_eq!(seqs(&again), [3, 4]);
    assert_eq!(log.verify().unwrap(), intact(4));
    drop(log);
    assert_eq!(open(&dir).verify().unwrap(), intact(4));
}

#[test]
fn failed_append_in_a_new_segment_is_retried_there() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("audit");
    let log = AuditFile::open(&dir, 1).unwrap();
    append(&log, 0..1);
    log.fail_next_sync();
    let mut lost = vec![issued(1)];
    log.append(&mut lost).unwrap_err();
    assert_eq!(seqs(&append(&log, 2..3)), [2]);
    assert_eq!(segments(&dir).len(), 2);
    assert_eq!(log.verify().unwrap(), intact(2));
    drop(log);
    let log = AuditFile::open(&dir, 1).unwrap();
    assert_eq!(log.verify().unwrap(), intact(2));
    assert_eq!(seqs(&log.read(&AuditFilter::default()).unwrap()), [1, 2]);
}

#[test]
fn segments_rotate_and_since_reads_across_them() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("audit");
    // About three lines per segment.
    let segment_bytes = 600;
    let mut all = Vec::new();
    {
        let log = AuditFile::open(&dir, segment_bytes).unwrap();
        for s in 0..20 {
            all.extend(append(&log, s..s + 1));
        }
        // Recorded last but stamped early (a slow request): `since` must still find it in the last segment.
        let mut late = vec![issued(5)];
        log.append(&mut late).unwrap();
        all.extend(late);
    }
    let files = segments(&dir);
    assert!(files.len() >= 5, "{files:?}");
    // Each segment is named after its first seq.
    assert_eq!(
        files[0].file_name().unwrap().to_str().unwrap(),
        "00000000000000000001.jsonl"
    );

    let log = AuditFile::open(&dir, segment_bytes).unwrap();
    assert_eq!(log.verify().unwrap(), intact(21));
    assert_eq!(log.read(&AuditFilter::default()).unwrap(), all);
    let since = |s: &str, limit: usize| AuditFilter {
        since: Some(s.to_owned()),
        limit,
        ..AuditFilter::default()
    };
    // Twice: the first read learns the sealed segments' latest timestamps, the second skips by them.
    for _ in 0..2 {
        assert_eq!(
            seqs(
                &log.read(&since("2026-02-17T14:00:15Z", usize::MAX))
                    .unwrap()
            ),
            [16, 17, 18, 19, 20]
        );
        assert_eq!(
            seqs(
                &log.read(&since("2026-02-17T14:00:05Z", usize::MAX))
                    .unwrap()
            ),
            (6..=21).collect::<Vec<_>>()
        );
        assert_eq!(
            seqs(&log.read(&since("2026-02-17T14:00:05Z", 3)).unwrap()),
            [6, 7, 8]
        );
    }
    // Appending continues in the last segment's chain.
    assert_eq!(seqs(&append(&log, 30..31)), [22]);
    assert_eq!(log.verify().unwrap(), intact(22));
}

#[test]
fn a_missing_middle_segment_breaks_the_chain_where_it_was() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("audit");
    {
        let log = AuditFile::open(&dir, 1).unwrap();
        for s in 0..4 {
            append(&log, s..s + 1);
        }
    }
    fs::remove_file(segment_path(&dir, 2)).unwrap();
    let log = AuditFile::open(&dir, 1).unwrap();
    assert_eq!(
        log.verify().unwrap(),
        ChainReport {
            events: 3,
            first_broken: Some(2)
        }
    );
}

#[test]
fn symlinked_segment_or_directory_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("audit");
    append(&open(&dir), 0..2);
    let [segment] = segments(&dir).try_into().unwrap();
    let elsewhere = tmp.path().join("elsewhere.jsonl");
    fs::rename(&segment, &elsewhere).unwrap();
    symlink(&elsewhere, &segment).unwrap();
    let err = AuditFile::open(&dir, SEGMENT_BYTES).err().unwrap();
    assert!(
        matches!(&err, StoreError::AuditFile { path, .. } if *path == segment),
        "{err:?}"
    );
    assert!(err.to_string().contains("symlinks are refused"), "{err}");
    // The target is untouched.
    assert_eq!(fs::read_to_string(&elsewhere).unwrap().lines().count(), 2);

    // A segment that is not there yet cannot be planted as a symlink either.
    let other = tmp.path().join("other");
    fs::create_dir(&other).unwrap();
    symlink(&elsewhere, other.join("00000000000000000001.jsonl")).unwrap();
    assert!(matches!(
        AuditFile::open(&other, SEGMENT_BYTES),
        Err(StoreError::AuditFile { .. })
    ));

    let linked_dir = tmp.path().join("linked");
    symlink(&other, &linked_dir).unwrap();
    let err = AuditFile::open(&linked_dir, SEGMENT_BYTES).err().unwrap();
    assert!(err.to_string().contains("symlinks are refused"), "{err}");
}

#[test]
fn log_directory_and_segments_are_owner_only() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("audit");
    append(&open(&dir), 0..1);
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    for segment in segments(&dir) {
        assert_eq!(mode(&segment), 0o600, "{}", segment.display());
    }
}

#[test]
fn lines_are_json_with_the_hashed_bytes_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("audit");
    let events = append(&open(&dir), 0..2);
    let [segment] = segments(&dir).try_into().unwrap();
    for (line, event) in fs::read_to_string(segment).unwrap().lines().zip(&events) {
        let value: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(value["hash"], event.hash.as_str());
        assert_eq!(value["event"]["seq"], event.seq);
        assert_eq!(value["event"]["hash"], "");
    }
}

#[test]
fn newest_reads_walk_back_across_blocks_and_segments() {
    for segment_bytes in [SEGMENT_BYTES, 20_000] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("audit");
        let log = AuditFile::open(&dir, segment_bytes).unwrap();
        // Well over one 64 KiB read-back block.
        for batch in 0..40 {
            append(&log, batch * 10..batch * 10 + 10);
        }
        let all = log.read(&AuditFilter::default()).unwrap();
        assert_eq!(all.len(), 400);
        for limit in [1, 7, 399, 400, 1000] {
            let newest = log
                .read(&AuditFilter {
                    limit,
                    newest: true,
                    ..AuditFilter::default()
                })
                .unwrap();
            assert_eq!(
                newest,
                all[400 - limit.min(400)..],
                "{segment_bytes} {limit}"
            );
        }
    }
}

#[test]
fn torn_first_line_of_a_new_segment_continues_the_chain_of_the_one_before() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("audit");
    {
        let log = AuditFile::open(&dir, 1).unwrap();
        append(&log, 0..1);
        append(&log, 1..2);
    }
    // kill -9 while the first batch of segment 2 was being written: only half of its line is there.
    let second = segment_path(&dir, 2);
    let line = fs::read(&second).unwrap();
    fs::write(&second, &line[..line.len() / 2]).unwrap();

    let log = AuditFile::open(&dir, 1).unwrap();
    assert_eq!(log.head().seq, 1);
    assert_eq!(seqs(&append(&log, 2..3)), [2]);
    assert_eq!(log.verify().unwrap(), intact(2));
    drop(log);
    assert_eq!(
        AuditFile::open(&dir, 1).unwrap().verify().unwrap(),
        intact(2)
    );
}

#[test]
fn a_line_sealed_in_the_batch_buffer_is_the_sealed_record_framed() {
    // `append` serialises straight into its buffer; the result must be byte for byte what
    // `seal` + `push_line` (the migration's and the tests' path) produce, with the same hash.
    let mut head = ChainHead::genesis();
    let mut by_record = ChainHead::genesis();
    let mut out = b"earlier line\n".to_vec();
    let mut expected = out.clone();
    for second in 0..3 {
        let mut a = issued(second);
        a.reason = Some("needs \"quotes\" and \u{e9}".to_owned());
        let mut b = a.clone();
        seal_line(&mut a, &mut head, &mut out).unwrap();
        let record = crate::seal(&mut b, &mut by_record).unwrap();
        push_line(&mut expected, &record);
        assert_eq!(a, b);
        assert_eq!(head, by_record);
    }
    assert_eq!(out, expected);
}
