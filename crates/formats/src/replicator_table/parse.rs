//! Parsing: the token cursor, keywords and values, the pieces, whole lines.

use super::*;

// ---------------------------------------------------------------------------
// Token cursor
// ---------------------------------------------------------------------------

pub(super) struct Cursor<'a, S> {
    toks: &'a [S],
    pos: usize,
}

impl<'a, S: AsRef<str>> Cursor<'a, S> {
    fn new(toks: &'a [S]) -> Self {
        Cursor { toks, pos: 0 }
    }

    fn peek(&self) -> Option<&'a str> {
        self.toks.get(self.pos).map(AsRef::as_ref)
    }

    fn at_end(&self) -> bool {
        self.pos >= self.toks.len()
    }

    fn remaining(&self) -> usize {
        self.toks.len().saturating_sub(self.pos)
    }

    /// The next token, or an error naming the field that was expected.
    fn next(&mut self, context: &str, field: &str, expected: &str) -> Result<&'a str, ReplicatorTableError> {
        match self.peek() {
            Some(t) => {
                self.pos += 1;
                Ok(t)
            }
            None => Err(invalid(context, field, expected, None)),
        }
    }

    /// A `#params` count followed by that many tokens, which are returned.
    fn counted(&mut self, context: &str, field: &str, expected: &str) -> Result<&'a [S], ReplicatorTableError> {
        let tok = self.next(context, field, expected)?;
        let n = parse_u64(tok).ok_or_else(|| invalid(context, field, expected, Some(tok)))?;
        let left = self.remaining();
        if n > left as u64 {
            return Err(with_note(
                invalid(context, field, format!("a count of at most {left} (the parameters left)"), Some(tok)),
                format!("{field} {n} counts more parameters than there are"),
            ));
        }
        let n = n as usize;
        let out = &self.toks[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }
}

/// An unsigned decimal integer: ASCII digits only.
pub(super) fn parse_u64(t: &str) -> Option<u64> {
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    t.parse().ok()
}

pub(super) fn number(context: &str, field: &str, what: &str, t: Option<&str>) -> Result<u64, ReplicatorTableError> {
    t.and_then(parse_u64).ok_or_else(|| invalid(context, field, what, t))
}

pub(super) fn slink_nr(context: &str, t: Option<&str>) -> Result<SlinkNr, ReplicatorTableError> {
    match t.and_then(parse_u64) {
        Some(n) if slink_nr_ok(n) => Ok(n as SlinkNr),
        _ => Err(invalid(context, "slink_nr", slink_nr_expected(), t)),
    }
}

pub(super) fn dev_nr(context: &str, t: Option<&str>) -> Result<u32, ReplicatorTableError> {
    match t.and_then(parse_u64) {
        Some(n) if n <= u32::MAX as u64 => Ok(n as u32),
        _ => Err(invalid(context, "dev_nr", "a device number 0..=4294967295", t)),
    }
}

pub(super) fn path(context: &str, field: &str, t: Option<&str>) -> Result<String, ReplicatorTableError> {
    match t {
        Some(p) if !p.is_empty() => Ok(p.to_string()),
        _ => Err(invalid(context, field, "a path", t)),
    }
}

// ---------------------------------------------------------------------------
// Keywords and values
// ---------------------------------------------------------------------------

pub(super) fn parse_policy(s: &str) -> Option<Policy> {
    let mut mode = None;
    let mut stall = false;
    for part in s.split('+') {
        let m = if part.len() >= 4 && "synchronous".starts_with(part) {
            Some(Mode::Synchronous)
        } else if part.len() >= 4 && "asynchronous".starts_with(part) {
            Some(Mode::Asynchronous)
        } else if part == "stall" && !stall {
            stall = true;
            None
        } else {
            return None;
        };
        if let Some(m) = m {
            if mode.replace(m).is_some() {
                return None;
            }
        }
    }
    mode.map(|mode| Policy { mode, stall })
}

pub(super) fn is_slink_type(t: &str) -> bool {
    matches!(t, "local" | "blockdev" | "net" | "s3")
}

/// `N[k|m|g|t]` (no suffix: sectors) to bytes.
pub(super) fn parse_size(v: &str) -> Option<u64> {
    let (digits, mult) = match v.as_bytes().last()?.to_ascii_lowercase() {
        b'k' => (&v[..v.len() - 1], 1u64 << 10),
        b'm' => (&v[..v.len() - 1], 1 << 20),
        b'g' => (&v[..v.len() - 1], 1 << 30),
        b't' => (&v[..v.len() - 1], 1 << 40),
        _ => (v, 512),
    };
    parse_u64(digits).filter(|&n| n > 0)?.checked_mul(mult)
}

/// `N[ms|s|m|h]` (no suffix: milliseconds) to milliseconds.
pub(super) fn parse_timeout(v: &str) -> Option<u64> {
    let (digits, mult) = if let Some(d) = v.strip_suffix("ms") {
        (d, 1)
    } else if let Some(d) = v.strip_suffix('s') {
        (d, 1000)
    } else if let Some(d) = v.strip_suffix('m') {
        (d, 60_000)
    } else if let Some(d) = v.strip_suffix('h') {
        (d, 3_600_000)
    } else {
        (v, 1)
    };
    parse_u64(digits).filter(|&n| n > 0)?.checked_mul(mult)
}

pub(super) fn render_size(bytes: u64) -> String {
    for (unit, sfx) in [(1u64 << 40, "t"), (1 << 30, "g"), (1 << 20, "m"), (1 << 10, "k")] {
        if bytes.is_multiple_of(unit) {
            return format!("{}{sfx}", bytes / unit);
        }
    }
    (bytes / 512).to_string()
}

pub(super) fn render_timeout(ms: u64) -> String {
    for (unit, sfx) in [(3_600_000u64, "h"), (60_000, "m"), (1000, "s")] {
        if ms.is_multiple_of(unit) {
            return format!("{}{sfx}", ms / unit);
        }
    }
    format!("{ms}ms")
}

/// Whether `toks[i]` starts a fall-behind threshold.
pub(super) fn is_threshold<S: AsRef<str>>(toks: &[S], i: usize) -> bool {
    let t = toks[i].as_ref();
    ["ios=", "size=", "timeout="].iter().any(|p| t.starts_with(p)) || matches!(t, "ios" | "size" | "timeout")
}

/// Parses the threshold at `toks[i]` into `fb`; returns how many tokens it used.
pub(super) fn parse_threshold<S: AsRef<str>>(
    context: &str,
    toks: &[S],
    i: usize,
    fb: &mut FallBehind,
) -> Result<usize, ReplicatorTableError> {
    let t = toks[i].as_ref();
    let (key, value, used) = match t.split_once('=') {
        Some((k, v)) => (k, Some(v), 1),
        None => (t, toks.get(i + 1).map(AsRef::as_ref), 2),
    };
    let (slot, parsed, expected) = match key {
        "ios" => (&mut fb.ios, value.and_then(parse_u64).filter(|&n| n > 0), "ios=N with N >= 1"),
        "size" => (&mut fb.size_bytes, value.and_then(parse_size), "size=N[k|m|g|t] with N >= 1 (no suffix: sectors)"),
        "timeout" => {
            (&mut fb.timeout_ms, value.and_then(parse_timeout), "timeout=N[ms|s|m|h] with N >= 1 (no suffix: ms)")
        }
        _ => return Err(unknown(context, "fall-behind threshold", t, FALLBEHIND_EXPECTED)),
    };
    let shown = if used == 1 { t.to_string() } else { format!("{t} {}", value.unwrap_or("")) };
    let v = parsed.ok_or_else(|| invalid(context, "fall-behind", expected, Some(shown.trim_end())))?;
    if slot.replace(v).is_some() {
        return Err(with_note(
            invalid(context, "fall-behind", format!("{key} at most once"), Some(&shown)),
            format!("{key} given twice"),
        ));
    }
    Ok(used)
}

// ---------------------------------------------------------------------------
// Parsing the pieces
// ---------------------------------------------------------------------------

pub(super) fn parse_log<S: AsRef<str>>(cur: &mut Cursor<'_, S>) -> Result<LogSpec, ReplicatorTableError> {
    const CTX: &str = "replication log";
    let ty = cur.next(CTX, "replog_type", "a replication log type (default|ringbuffer)")?;
    let kind = match ty {
        "default" | "ringbuffer" => LogKind::Default,
        _ => return Err(unknown(CTX, "replication log type", ty, "default|ringbuffer")),
    };
    let shape = "2 to 5 (<path> <start_sector> [auto|open|create [<size_sectors>]] [role=primary|secondary])";
    let mut params: Vec<&str> = cur.counted(CTX, "#replog_params", shape)?.iter().map(AsRef::as_ref).collect();
    let mut role = None;
    if let Some(r) = params.last().and_then(|t| t.strip_prefix("role=")) {
        role = Some(match r {
            "primary" => crate::replog::SiteRole::Primary,
            "secondary" => crate::replog::SiteRole::Secondary,
            other => return Err(unknown(CTX, "role", other, "primary|secondary")),
        });
        params.pop();
    }
    if !(2..=4).contains(&params.len()) {
        return Err(invalid(
            CTX,
            "#replog_params",
            shape,
            Some(&(params.len() + usize::from(role.is_some())).to_string()),
        ));
    }
    let p = |i: usize| params.get(i).map(AsRef::as_ref);
    let path = path(CTX, "path", p(0))?;
    let start_sector = number(CTX, "start_sector", "a sector number", p(1))?;
    let open_mode = match p(2) {
        None => OpenMode::Open,
        Some("auto") => OpenMode::Auto,
        Some("open") => OpenMode::Open,
        Some("create") => OpenMode::Create,
        Some(other) => return Err(unknown(CTX, "open mode", other, "auto|open|create")),
    };
    let size_sectors = match p(3) {
        None => None,
        Some(t) if open_mode == OpenMode::Open => {
            return Err(with_note(
                invalid(CTX, "size_sectors", "no size after \"open\"", Some(t)),
                "an existing log's size is read from it; give a size with auto or create",
            ))
        }
        Some(t) => Some(
            parse_u64(t)
                .filter(|&n| n > 0)
                .ok_or_else(|| invalid(CTX, "size_sectors", "a size in sectors >= 1", Some(t)))?,
        ),
    };
    Ok(LogSpec { kind, path, start_sector, open_mode, size_sectors, role })
}

/// `<slink_type> <#slink_params> <slink_nr> [<policy> [<fallbehind>...]] [<transport>...]`.
/// `entry` is the 1-based entry number, for errors before the SLINK number is known.
pub(super) fn parse_slink<S: AsRef<str>>(
    cur: &mut Cursor<'_, S>,
    entry: usize,
) -> Result<SlinkSpec, ReplicatorTableError> {
    let ectx = format!("slink entry {entry}");
    let ty = cur.next(&ectx, "slink_type", &format!("an SLINK type ({SLINK_TYPES})"))?;
    if !is_slink_type(ty) {
        return Err(unknown(ectx, "SLINK type", ty, SLINK_TYPES));
    }
    let params = cur.counted(&ectx, "#slink_params", "a parameter count (<slink_nr> [<policy> [<fallbehind>...]])")?;
    let nr = slink_nr(&ectx, params.first().map(AsRef::as_ref))?;
    let ctx = format!("slink {nr}");
    let local = ty == "local" || ty == "blockdev";
    let mut i = 1;
    let mut policy = Policy::default();
    if let Some(t) = params.get(1).map(AsRef::as_ref) {
        if let Some(p) = parse_policy(t) {
            policy = p;
            i = 2;
        } else if local && !is_threshold(params, 1) {
            // (For net/s3 such a token starts the transport parameters.)
            return Err(unknown(&ctx, "policy", t, POLICY_EXPECTED));
        }
    }
    let mut fallbehind = FallBehind::default();
    while i < params.len() && is_threshold(params, i) {
        i += parse_threshold(&ctx, params, i, &mut fallbehind)?;
    }
    let mut rest: Vec<String> = params.get(i..).unwrap_or_default().iter().map(|s| s.as_ref().to_string()).collect();
    let resync_snapshot = local && rest.first().is_some_and(|t| t == RESYNC_SNAPSHOT);
    if resync_snapshot {
        rest.remove(0);
    } else if !local && rest.iter().any(|t| t == RESYNC_SNAPSHOT) {
        return Err(with_note(
            invalid(&ctx, "option", "resync_snapshot on local SLINKs only", Some(RESYNC_SNAPSHOT)),
            "a site's devices are snapshotted by that site: set it on SLINK 0 of the site's own table",
        ));
    }
    let kind = match ty {
        "net" => SlinkKind::Net { params: rest },
        "s3" => SlinkKind::S3 { params: rest },
        _ => {
            debug_assert!(local);
            if let Some(t) = rest.first() {
                return Err(unknown(&ctx, "fall-behind threshold", t, FALLBEHIND_EXPECTED));
            }
            SlinkKind::Local
        }
    };
    if policy.mode == Mode::Synchronous && !fallbehind.is_empty() {
        return Err(ReplicatorTableError::SyncWithFallBehind { slink: nr, found: fallbehind.to_args().join(" ") });
    }
    Ok(SlinkSpec { nr, kind, policy, fallbehind, resync_snapshot })
}

/// `<dlog_type> <#dlog_params> <dlog_params>...`.
pub(super) fn parse_dirty_log<S: AsRef<str>>(
    cur: &mut Cursor<'_, S>,
    ctx: &str,
) -> Result<DirtyLogSpec, ReplicatorTableError> {
    let ty = cur.next(ctx, "dlog_type", "a dirty log type (-|nolog|core|disk)")?;
    let (shape, range) = match ty {
        "-" | "nolog" => ("0", 0..=0),
        "core" => ("1 or 2 (<region_sectors> [sync|nosync])", 1..=2),
        "disk" => ("2 or 3 (<path> <region_sectors> [sync|nosync])", 2..=3),
        _ => return Err(unknown(ctx, "dirty log type", ty, "-|nolog|core|disk")),
    };
    let field = "#dlog_params";
    let params = cur.counted(ctx, field, shape)?;
    if !range.contains(&params.len()) {
        return Err(invalid(ctx, field, shape, Some(&params.len().to_string())));
    }
    let p = |i: usize| params.get(i).map(AsRef::as_ref);
    let region = |t: Option<&str>| match t.and_then(parse_u64) {
        Some(n) if n >= MIN_REGION_SECTORS && n.is_power_of_two() => Ok(n),
        _ => Err(invalid(ctx, "region_sectors", format!("a power of two >= {MIN_REGION_SECTORS} (sectors)"), t)),
    };
    let sync = |t: Option<&str>| match t {
        None | Some("sync") => Ok(true),
        Some("nosync") => Ok(false),
        Some(other) => Err(unknown(ctx, "dirty log flag", other, "sync|nosync")),
    };
    Ok(match ty {
        "core" => DirtyLogSpec::Core { region_sectors: region(p(0))?, sync: sync(p(1))? },
        "disk" => DirtyLogSpec::Disk {
            path: path(ctx, "dirty log path", p(0))?,
            region_sectors: region(p(1))?,
            sync: sync(p(2))?,
        },
        _ => DirtyLogSpec::None,
    })
}

// ---------------------------------------------------------------------------
// Whole lines
// ---------------------------------------------------------------------------

/// Parses the arguments of a `replicator` line, in either form (see the module
/// documentation), and validates them.
pub fn parse_replicator<S: AsRef<str>>(args: &[S]) -> Result<ReplicatorSpec, ReplicatorTableError> {
    let mut cur = Cursor::new(args);
    let log = parse_log(&mut cur)?;
    if cur.at_end() {
        return Err(with_note(
            invalid(
                "replicator",
                "slink_type",
                format!("an SLINK entry ({SLINK_TYPES}) after the replication log"),
                None,
            ),
            "slink 0 at least",
        ));
    }

    let mut slinks: BTreeMap<SlinkNr, SlinkSpec> = BTreeMap::new();
    let mut devices: BTreeMap<u32, Vec<ReplicaSpec>> = BTreeMap::new();
    // Decided by the first entry: does each entry carry a device?
    let mut one_line: Option<bool> = None;
    let mut entry = 0;
    while !cur.at_end() {
        entry += 1;
        let s = parse_slink(&mut cur, entry)?;
        let nr = s.nr;
        let next = cur.peek();
        let carries = match one_line {
            Some(f) => f,
            None => {
                let f = next.is_some_and(|t| parse_u64(t).is_some());
                if !f && next.is_some_and(|t| !is_slink_type(t)) {
                    return Err(with_note(
                        invalid(
                            format!("slink {nr}"),
                            "#dev_params",
                            format!(
                                "a device parameter count (one-line form) or the next \
                                 SLINK entry ({SLINK_TYPES}; two-target form)"
                            ),
                            next,
                        ),
                        "does the #slink_params count cover all the SLINK's parameters?",
                    ));
                }
                one_line = Some(f);
                f
            }
        };
        merge_slink(&mut slinks, s)?;
        if !carries {
            if let Some(t) = next.filter(|t| !is_slink_type(t)) {
                return Err(with_note(
                    invalid(
                        format!("slink {nr}"),
                        "slink_type",
                        format!("the next SLINK entry ({SLINK_TYPES})"),
                        Some(t),
                    ),
                    "the first SLINK entry has no devices, so this is the two-target \
                     form's control device, where no entry carries devices",
                ));
            }
            continue;
        }
        let ctx = format!("slink {nr}");
        let shape = "2 (<dev_nr> <dev_path>)";
        let count_tok = cur.peek();
        if count_tok.and_then(parse_u64).is_none() {
            return Err(with_note(
                invalid(&ctx, "#dev_params", shape, count_tok),
                "the first SLINK entry carries a device, so this is the one-line form, where every \
                 entry carries one; does the #slink_params count cover all the SLINK's parameters?",
            ));
        }
        let dev = cur.counted(&ctx, "#dev_params", shape)?;
        if dev.len() != 2 {
            return Err(invalid(&ctx, "#dev_params", shape, Some(&dev.len().to_string())));
        }
        let dev_nr = dev_nr(&ctx, Some(dev[0].as_ref()))?;
        let ctx = format!("slink {nr} device {dev_nr}");
        let path = path(&ctx, "dev_path", Some(dev[1].as_ref()))?;
        let dirty_log = parse_dirty_log(&mut cur, &ctx)?;
        let replicas = devices.entry(dev_nr).or_default();
        if replicas.iter().any(|r| r.slink_nr == nr) {
            return Err(ReplicatorTableError::DuplicateReplica { slink: nr, dev_nr });
        }
        replicas.push(ReplicaSpec { slink_nr: nr, path, dirty_log });
    }

    let spec = ReplicatorSpec {
        log,
        slinks: slinks.into_values().collect(),
        devices: devices
            .into_iter()
            .map(|(dev_nr, mut replicas)| {
                replicas.sort_by_key(|r| r.slink_nr);
                DeviceSpec { dev_nr, replicas }
            })
            .collect(),
    };
    spec.validate()?;
    Ok(spec)
}

/// Adds an SLINK entry; a repeated one must agree with the first.
pub(super) fn merge_slink(slinks: &mut BTreeMap<SlinkNr, SlinkSpec>, s: SlinkSpec) -> Result<(), ReplicatorTableError> {
    let Some(first) = slinks.get(&s.nr) else {
        slinks.insert(s.nr, s);
        return Ok(());
    };
    let conflict =
        |what, a: String, b: String| ReplicatorTableError::SlinkConflict { slink: s.nr, what, first: a, found: b };
    if first.kind.name() != s.kind.name() {
        return Err(conflict("type", first.kind.name().into(), s.kind.name().into()));
    }
    if first.policy != s.policy {
        return Err(conflict("policy", first.policy.to_string(), s.policy.to_string()));
    }
    if first.fallbehind != s.fallbehind {
        return Err(conflict("fall-behind", first.fallbehind.to_args().join(" "), s.fallbehind.to_args().join(" ")));
    }
    if first.resync_snapshot != s.resync_snapshot {
        let on = |b: bool| if b { RESYNC_SNAPSHOT.to_string() } else { "no resync_snapshot".to_string() };
        return Err(conflict("options", on(first.resync_snapshot), on(s.resync_snapshot)));
    }
    if first.kind != s.kind {
        return Err(conflict("transport parameters", first.kind.params().join(" "), s.kind.params().join(" ")));
    }
    Ok(())
}

/// Parses the arguments of a `replicator-dev` line and validates them.
pub fn parse_replicator_dev<S: AsRef<str>>(args: &[S]) -> Result<ReplicatorDevSpec, ReplicatorTableError> {
    const CTX: &str = "replicator-dev";
    let mut cur = Cursor::new(args);
    let control = match cur.peek() {
        Some(c) if !c.is_empty() => c.to_string(),
        other => return Err(invalid(CTX, "control_dev", "the name of the replicator control device", other)),
    };
    cur.pos += 1;
    let dev_nr = dev_nr(CTX, cur.peek())?;
    cur.pos += 1;
    if cur.at_end() {
        return Err(invalid(
            format!("device {dev_nr}"),
            "slink_nr",
            "a device entry (<slink_nr> 1 <dev_path> <dlog_type> <#dlog_params> ...), \
             slink 0 at least",
            None,
        ));
    }
    let mut replicas: Vec<ReplicaSpec> = Vec::new();
    while !cur.at_end() {
        let ctx = format!("device {dev_nr}");
        let nr = slink_nr(&ctx, cur.peek())?;
        cur.pos += 1;
        let ctx = format!("slink {nr} device {dev_nr}");
        let shape = "1 (<dev_path>)";
        let dev = cur.counted(&ctx, "#dev_params", shape)?;
        if dev.len() != 1 {
            return Err(invalid(&ctx, "#dev_params", shape, Some(&dev.len().to_string())));
        }
        let path = path(&ctx, "dev_path", Some(dev[0].as_ref()))?;
        let dirty_log = parse_dirty_log(&mut cur, &ctx)?;
        if replicas.iter().any(|r| r.slink_nr == nr) {
            return Err(ReplicatorTableError::DuplicateReplica { slink: nr, dev_nr });
        }
        replicas.push(ReplicaSpec { slink_nr: nr, path, dirty_log });
    }
    replicas.sort_by_key(|r| r.slink_nr);
    let spec = ReplicatorDevSpec { control, dev_nr, replicas };
    spec.validate()?;
    Ok(spec)
}
