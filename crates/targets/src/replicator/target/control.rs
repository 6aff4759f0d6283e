//! The `replicator` control target: the group, its log and SLINKs.

use super::*;

pub struct ReplicatorTarget {
    name: String,
    spec: ReplicatorSpec,
    handle: Arc<GroupHandle>,
    group: Arc<Group>,
    /// A reloaded table's changes, applied when it becomes live (resume).
    pending: Mutex<Option<Reload>>,
}

impl ReplicatorTarget {
    fn build(
        ctx: &BuildContext<'_>,
        spec: ReplicatorSpec,
        handle: Arc<GroupHandle>,
        group: Arc<Group>,
        pending: Option<Reload>,
    ) -> Arc<dyn Target> {
        Arc::new(ReplicatorTarget {
            name: ctx.device_name.to_string(),
            spec,
            handle,
            group,
            pending: Mutex::new(pending),
        })
    }
}

/// What a reloaded table changes in the live group: new policies, and new SLINKs with
/// their devices attached and their dirty logs opened (so errors surface at `load`).
struct Reload {
    policies: Vec<(SlinkNr, Policy, Thresholds)>,
    new_slinks: Vec<(SlinkSetup, Vec<NewReplica>)>,
    /// SLINKs the new table leaves out.
    removed: Vec<SlinkNr>,
    /// Replicas of existing SLINKs with a new path: (dev_nr, replica, its dirty log), and
    /// the claim on the new device (its handler keeps it).
    replacements: Vec<(NewReplica, Claim)>,
}

/// A device of a new SLINK: its dev_nr, its replica and its opened dirty log.
type NewReplica = (u32, ReplicaSpec, OpenedDirty);

/// A table for a control device whose group is live: the same log, the same devices on
/// the existing SLINKs; SLINKs may be added and policies changed. Prepared (new devices
/// opened and checked) now, applied on resume.
fn reload(
    ctx: &BuildContext<'_>,
    seg: &SegmentSpec,
    spec: ReplicatorSpec,
    handle: Arc<GroupHandle>,
    group: Arc<Group>,
) -> Result<Arc<dyn Target>, TargetError> {
    let log_id = FileId::of_path(Path::new(&spec.log.path))
        .map_err(|e| TargetError::Device { path: spec.log.path.clone(), source: e })?;
    if (log_id, sectors_to_bytes(spec.log.start_sector)) != handle.log_key {
        return Err(TargetError::params(T, "a reloaded table must keep the group's replication log (path and start)"));
    }
    if spec.log.size_sectors != handle.log_size {
        let size = |s: Option<u64>| s.map_or("no size".to_string(), |s| format!("{s} sectors"));
        return Err(TargetError::params(
            T,
            format!(
                "a reloaded table must keep the replication log's size ({} in the live table, {} in this one): \
                 a live log cannot be resized",
                size(handle.log_size),
                size(spec.log.size_sectors)
            ),
        ));
    }
    if sectors_to_bytes(seg.len) != handle.dev_bytes {
        return Err(TargetError::params(T, "a reloaded table must keep the length of the group's devices"));
    }
    let live = group.slink_numbers();
    // SLINKs the new table leaves out leave the group (never SLINK 0).
    let removed: Vec<SlinkNr> = live.iter().copied().filter(|nr| spec.slink(*nr).is_none()).collect();
    if removed.contains(&0) {
        return Err(TargetError::params(T, "slink 0 (the local devices) cannot be removed from a live group"));
    }
    let declared = handle.declared.lock().clone();
    // A device of an existing SLINK with a new path is a replaced replica (a failed RD
    // swapped for a new one): it gets an initial copy of its own. LDs stay.
    let mut replaced = Vec::new();
    for (s, d, p) in declared.iter().filter(|(s, _, _)| !removed.contains(s)) {
        let now = spec.device(*d).and_then(|dev| dev.replicas.iter().find(|r| r.slink_nr == *s));
        match now {
            Some(r) if r.path == *p => {}
            Some(r) if *s != 0 => replaced.push((*s, *d, r.clone())),
            _ => {
                return Err(TargetError::params(
                    T,
                    format!("device {d} on slink {s} must stay {p} in a reloaded table (a live group keeps its LDs; an RD may be replaced by naming a new path)"),
                ))
            }
        }
    }
    // A new SLINK joins with a device and a dirty log for every device of the group, or
    // not at all (an SLINK without them could never be in sync).
    let live_devs = group.device_numbers();
    for s in spec.slinks.iter().filter(|s| !live.contains(&s.nr)) {
        for d in &live_devs {
            if !spec.device(*d).is_some_and(|dev| dev.replicas.iter().any(|r| r.slink_nr == s.nr)) {
                return Err(TargetError::params(
                    T,
                    format!(
                        "slink {} cannot join group {}: device {d} of the group has no device on it \
                         (a new slink needs a device and a dirty log for every device of the group, \
                         given in the one-line table form)",
                        s.nr, ctx.device_name
                    ),
                ));
            }
        }
    }
    // (Transports and per-device replicas were checked by `construct`.)
    let mut policies = Vec::new();
    let mut new_slinks = Vec::new();
    let claiming = Claiming::new(ctx.devices.claims(), &handle.owner, ctx.device_name);
    for s in &spec.slinks {
        let (policy, thresholds) = (s.policy, thresholds_of(&s.fallbehind));
        if live.contains(&s.nr) {
            policies.push((s.nr, policy, thresholds));
            continue;
        }
        let h = Arc::new(LocalSlink::new());
        let mut reps = Vec::new();
        for d in &spec.devices {
            let r = d.replicas.iter().find(|r| r.slink_nr == s.nr).ok_or_else(|| {
                TargetError::params(T, format!("device {}: no device on new slink {}", d.dev_nr, s.nr))
            })?;
            let claim = claiming.device(s.nr, d.dev_nr, &r.path, handle.dev_bytes)?;
            h.attach(d.dev_nr, &r.path, handle.dev_bytes)?;
            h.keep_claim(d.dev_nr, claim);
            reps.push((d.dev_nr, r.clone(), open_dirty(r, d.dev_nr, handle.dev_bytes, true, true, &claiming)?));
        }
        new_slinks.push((SlinkSetup { nr: s.nr, handler: h, policy, thresholds }, reps));
    }
    let mut replacements = Vec::new();
    for (s, d, r) in replaced {
        let claim = claiming.device(s, d, &r.path, handle.dev_bytes)?;
        // Opened and size-checked now (so errors surface at `load`), attached at resume.
        LocalSlink::new().attach(d, &r.path, handle.dev_bytes)?;
        let opened = open_dirty(&r, d, handle.dev_bytes, true, true, &claiming)?;
        replacements.push(((d, r, opened), claim));
    }
    handle.users.fetch_add(1, Ordering::SeqCst);
    claiming.accept();
    let reload = Reload { policies, new_slinks, removed, replacements };
    Ok(ReplicatorTarget::build(ctx, spec, handle, group, Some(reload)))
}

pub fn construct(ctx: &BuildContext<'_>, seg: &SegmentSpec) -> Result<Arc<dyn Target>, TargetError> {
    let spec = parse_replicator(&seg.args).map_err(|e| TargetError::params(T, e.to_string()))?;
    for s in &spec.slinks {
        if s.kind != SlinkKind::Local && crate::replicator::slink::transport(s.kind.name()).is_none() {
            return Err(TargetError::params(
                T,
                format!(
                    "slink {}: transport \"{}\" is not available here (a daemon started with --site-name and TLS \
                     files offers net; local always works)",
                    s.nr,
                    s.kind.name()
                ),
            ));
        }
    }
    for d in &spec.devices {
        for s in &spec.slinks {
            if !d.replicas.iter().any(|r| r.slink_nr == s.nr) {
                return Err(TargetError::params(T, format!("device {}: no device on slink {}", d.dev_nr, s.nr)));
            }
        }
    }
    let dev_bytes = sectors_to_bytes(seg.len);
    if let Some(handle) = ctx.devices.lookup::<GroupHandle>(ctx.device_name) {
        if let Some(group) = handle.group() {
            return reload(ctx, seg, spec, handle, group);
        }
    }

    // The SLINKs and, in the paper form, the devices: claimed, opened and size-checked
    // before the log is touched, so a refused table writes nothing.
    let owner = Owner::new(ctx.device_name);
    let claiming = Claiming::new(ctx.devices.claims(), &owner, ctx.device_name);
    let mut claims = Vec::new();
    let mut setups = Vec::new();
    let mut declared = Vec::new();
    for s in spec.slinks.iter().filter(|s| s.kind == SlinkKind::Local) {
        let h = Arc::new(LocalSlink::new());
        for d in &spec.devices {
            for r in d.replicas.iter().filter(|r| r.slink_nr == s.nr) {
                // (Opened once the group runs; claimed now, before the log is touched.)
                claims.extend(claiming.dirty_log(d.dev_nr, r, dev_bytes)?);
                if missing_rd(ctx, s.nr, &r.path) {
                    h.attach_missing(d.dev_nr, &r.path, dev_bytes);
                } else {
                    let claim = claiming.device(s.nr, d.dev_nr, &r.path, dev_bytes)?;
                    h.attach(d.dev_nr, &r.path, dev_bytes)?;
                    // Held while the device is attached (a replaced replica lets it go).
                    h.keep_claim(d.dev_nr, claim);
                }
                declared.push((s.nr, d.dev_nr, r.path.clone()));
            }
        }
        setups.push(SlinkSetup {
            nr: s.nr,
            handler: h as Arc<dyn SlinkHandler>,
            policy: s.policy,
            thresholds: thresholds_of(&s.fallbehind),
        });
    }
    // The log.
    let lpath = &spec.log.path;
    let start = sectors_to_bytes(spec.log.start_sector);
    // A restored table was live before, so its log was made then: restoring opens it,
    // whatever the mode. Making it again (`create`; `auto` finding none, or the file
    // missing) would drop the entries not yet applied everywhere.
    let open_mode = if ctx.restoring { OpenMode::Open } else { spec.log.open_mode };
    if let (OpenMode::Create | OpenMode::Auto, Some(sectors)) = (open_mode, spec.log.size_sectors) {
        claiming.create_if_missing(lpath, start + sectors_to_bytes(sectors))?;
    }
    let backend: Arc<dyn BlockBackend> = Arc::new(
        FileBackend::open(Path::new(lpath)).map_err(|e| TargetError::Device { path: lpath.clone(), source: e })?,
    );
    let size = match spec.log.size_sectors {
        Some(s) => sectors_to_bytes(s),
        None => backend.size().saturating_sub(start) & !4095,
    };
    if start + size > backend.size() && open_mode != OpenMode::Open {
        return Err(TargetError::params(
            T,
            format!(
                "replication log {lpath}: {} sectors from sector {} do not fit in its {} sectors",
                size / 512,
                start / 512,
                backend.size() / 512
            ),
        ));
    }
    if matches!(open_mode, OpenMode::Create | OpenMode::Auto) && size < MIN_LOG_BYTES {
        // (`auto` may find a valid log there; a log this small could not be used anyway.)
        return Err(TargetError::params(
            T,
            format!(
                "replication log {lpath}: {} sectors is too small: it must hold at least one maximal entry \
                 ({} KiB of data plus headers; at least {} sectors)",
                size / 512,
                MAX_ENTRY_DATA / 1024,
                MIN_LOG_BYTES / 512
            ),
        ));
    }
    let log_claim = claiming.claim(lpath, start..start.saturating_add(size), "replication log".to_string())?;
    let log_id = log_claim.file();
    claims.push(log_claim);
    let log_err = |e: crate::replicator::log::LogError| {
        TargetError::params(T, format!("replication log {lpath}: {}", dmrep_core::errors::with_causes(&e)))
    };
    let (log, recovery) = match open_mode {
        OpenMode::Create => (RingLog::create(backend, start, size).map_err(log_err)?, None),
        OpenMode::Open => {
            let (l, r) = RingLog::open(backend, start).map_err(log_err)?;
            (l, Some(r))
        }
        OpenMode::Auto => RingLog::open_or_create(backend, start, size).map_err(log_err)?,
    };
    if let Some(r) = &recovery {
        tracing::info!(group = ctx.device_name, "replication log recovered: {r:?}");
    }
    // An opened log's size is the one on disk (only its superblocks, inside the range
    // claimed above, were written): claim all of it.
    let on_disk = log.stats().size;
    if on_disk > size {
        claims.push(claiming.claim(lpath, start..start.saturating_add(on_disk), "replication log".to_string())?);
    }
    if log.max_entry_data() < MAX_ENTRY_DATA {
        return Err(TargetError::params(
            T,
            format!(
                "replication log {lpath} is too small: it must hold at least one maximal entry ({} KiB of data plus its header)",
                MAX_ENTRY_DATA / 1024
            ),
        ));
    }

    let fresh_log = recovery.is_none();
    let log = Arc::new(log);
    if fresh_log && spec.log.role == Some(dmrep_formats::replog::SiteRole::Secondary) {
        // A new secondary belongs to no group yet: the first authenticated primary of
        // the group's name binds it to its UUID.
        log.set_site(|s| {
            s.role = dmrep_formats::replog::SiteRole::Secondary;
            s.group_uuid = [0; 16];
        })
        .map_err(log_err)?;
    }
    let role = log.site().role;
    if let Some(r) = spec.log.role.filter(|r| *r != role) {
        tracing::info!(
            group = ctx.device_name,
            table = r.name(),
            log = role.name(),
            "the table's role differs from the log's: the log's role stands (a switchover or takeover changes it)"
        );
    }
    // Transports other than local: SLINKs of the group at either role (at a secondary
    // they stand by: the primary's stream reaches the other sites, see `machine::roles`).
    for s in spec.slinks.iter().filter(|s| s.kind != SlinkKind::Local) {
        let t = crate::replicator::slink::transport(s.kind.name()).expect("checked above");
        let h = t.create(crate::replicator::slink::LinkSetup {
            group: ctx.device_name,
            slink: s.nr,
            params: s.kind.params(),
            log: log.clone(),
            dev_bytes,
        })?;
        for d in &spec.devices {
            for r in d.replicas.iter().filter(|r| r.slink_nr == s.nr) {
                claims.extend(claiming.dirty_log(d.dev_nr, r, dev_bytes)?);
                h.attach(d.dev_nr, &r.path, dev_bytes)?;
                declared.push((s.nr, d.dev_nr, r.path.clone()));
            }
        }
        setups.push(SlinkSetup { nr: s.nr, handler: h, policy: s.policy, thresholds: thresholds_of(&s.fallbehind) });
    }
    setups.sort_by_key(|s| s.nr);
    let group =
        Group::start(ctx.device_name, log, lpath.clone(), recovery, setups).map_err(|e| TargetError::failed(T, e))?;
    if let Some(slot) = ctx.devices.lookup::<crate::replicator::marker::HookSlot>(crate::replicator::marker::HOOK_KEY) {
        group.set_marker_hook(slot.0.clone());
    }
    for s in &spec.slinks {
        group.set_resync_snapshot(s.nr, s.resync_snapshot);
    }
    for d in &spec.devices {
        for r in &d.replicas {
            if let Err(e) = attach_dirty(&group, d.dev_nr, r, dev_bytes, fresh_log || !ctx.restoring, &claiming) {
                group.shutdown();
                return Err(e);
            }
        }
    }
    claiming.accept();
    let handle = Arc::new(GroupHandle {
        group: Mutex::new(Some(group.clone())),
        declared: Mutex::new(declared),
        users: AtomicUsize::new(1),
        log_key: (log_id, start),
        log_size: spec.log.size_sectors,
        owner,
        claims: Mutex::new(claims),
        dev_bytes,
        fresh_log,
    });
    ctx.devices.publish(ctx.device_name, handle.clone());
    Ok(ReplicatorTarget::build(ctx, spec, handle, group, None))
}

impl Target for ReplicatorTarget {
    fn type_name(&self) -> &'static str {
        T
    }

    fn holds_data(&self) -> bool {
        false
    }

    fn submit(&self, mut req: Request, done: Completion) {
        match req.op {
            Op::Read => {
                req.buf.fill(0);
                done.complete(req, Ok(()))
            }
            Op::Flush => done.complete(req, Ok(())),
            _ => done.complete(req, Err(io::Error::from_raw_os_error(rustix::io::Errno::PERM.raw_os_error()))),
        }
    }

    fn status(&self) -> TargetStatus {
        let st = self.group.status();
        let mut line = format!("{}", st.slinks.len());
        for s in &st.slinks {
            line.push_str(&format!(
                " {}:{},{},{},{}ms,{}{}",
                s.slink,
                s.mode.letter(),
                s.outstanding_ios,
                s.outstanding_bytes,
                s.oldest_outstanding_ms.unwrap_or(0),
                if s.accessible { "up" } else { "down" },
                match (s.paused, s.sync.ordered) {
                    (true, true) => ",paused".to_string(),
                    (false, true) => String::new(),
                    (p, false) => format!(
                        "{},{} {}/{} dirty",
                        if p { ",paused" } else { "" },
                        s.sync.state,
                        s.sync.dirty_regions,
                        s.sync.regions
                    ),
                }
            ));
        }
        line.push_str(&format!(
            " log {}/{} head {} next {}",
            st.log.used_bytes, st.log.ring_len, st.log.head_seq, st.log.next_seq
        ));
        if st.writes_held {
            line.push_str(&format!(" writes held ({} queued)", st.queued_writes));
        }
        let site = &st.site;
        if site.role == dmrep_formats::replog::SiteRole::Secondary {
            line.push_str(&format!(
                " secondary gen {} of {} received {} applied {} lag {},{},{:.1}s",
                site.generation,
                site.primary.as_deref().unwrap_or("(primary not connected)"),
                site.received,
                site.applied,
                site.lag_entries,
                site.lag_bytes,
                site.lag_seconds
            ));
        } else if site.generation > 1 {
            line.push_str(&format!(" primary gen {}", site.generation));
        }
        TargetStatus::new(line, serde_json::to_value(&st).unwrap_or_default())
    }

    fn message(&self, args: &[String]) -> Result<String, TargetError> {
        let err = |m: String| TargetError::Message { target: T, msg: m };
        let refused = |e: crate::replicator::group::GroupError| TargetError::Message { target: T, msg: e.to_string() };
        let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        match a.as_slice() {
            ["stop" | "suspend", rest @ ..] if rest.is_empty() || rest == ["all"] => {
                self.group.set_shipping(false);
                Ok("shipping stopped".into())
            }
            ["start" | "resume", rest @ ..] if rest.is_empty() || rest == ["all"] => {
                self.group.set_shipping(true);
                Ok("shipping started".into())
            }
            ["slink", nr, "resync-rate", rate] => {
                let nr = parse_slink(nr).map_err(err)?;
                let rate: u64 = rate.parse().map_err(|_| {
                    err(format!("resync-rate: expected bytes per second (0 = unlimited), found {rate:?}"))
                })?;
                self.group.set_resync_rate(nr, rate).map_err(refused)?;
                Ok(format!("slink {nr} resync-rate {rate}"))
            }
            ["slink", nr, "invalidate"] => {
                let nr = parse_slink(nr).map_err(err)?;
                self.group.invalidate(nr).map_err(refused)?;
                Ok(format!("slink {nr} invalidated: every region will be copied again"))
            }
            ["slink", nr, op @ ("pause" | "resume")] => {
                let nr = parse_slink(nr).map_err(err)?;
                self.group.set_paused(nr, *op == "pause").map_err(refused)?;
                Ok(format!("slink {nr} {}", if *op == "pause" { "paused" } else { "resumed" }))
            }
            ["statistics", cmd] => self.group.statistics(cmd).map(|_| String::new()).map_err(refused),
            // Follow the sun (answers are JSON: the CLI's role commands print them).
            ["role"] => Ok(json(&self.group.role_info())),
            ["switchover", site, rest @ ..] if rest.len() <= 1 => {
                let secs: f64 = match rest.first() {
                    Some(t) => {
                        t.parse().map_err(|_| err(format!("switchover timeout: expected seconds, found {t:?}")))?
                    }
                    None => 30.0,
                };
                let r = self.group.switchover(site, Duration::from_secs_f64(secs.max(0.001))).map_err(refused)?;
                Ok(json(&r))
            }
            ["takeover", rest @ ..] if rest.is_empty() || rest == ["force"] => {
                Ok(json(&self.group.takeover(!rest.is_empty()).map_err(refused)?))
            }
            ["verify", nr, rest @ ..] => {
                let nr = parse_slink(nr).map_err(err)?;
                let (mut rate, mut fix) = (0u64, false);
                for w in rest {
                    match *w {
                        "fix" => fix = true,
                        w if w.starts_with("rate=") => {
                            rate = w[5..].parse().map_err(|_| err(format!("verify: rate=<bytes/s>, found {w:?}")))?
                        }
                        other => return Err(err(format!("verify: unknown option {other:?} (rate=<bytes/s>, fix)"))),
                    }
                }
                self.group.verify_start(nr, self.handle.dev_bytes, rate, fix).map_err(refused)?;
                Ok(json(&self.group.verify_status()))
            }
            ["verify-status"] => Ok(json(&self.group.verify_status())),
            // Group-consistent snapshots (answers are JSON).
            ["snapshot", name, nr] => {
                let nr = parse_slink(nr).map_err(err)?;
                Ok(json(&self.group.snapshot_marker(name, nr).map_err(refused)?))
            }
            ["snapshot-outcome", name, rest @ ..] if rest.len() <= 1 => {
                let ms: u64 = match rest.first() {
                    Some(t) => t.parse().map_err(|_| err(format!("snapshot-outcome: wait in ms, found {t:?}")))?,
                    None => 0,
                };
                let o = match ms {
                    0 => self.group.marker_outcome(name),
                    ms => self.group.wait_marker(name, Duration::from_millis(ms)),
                };
                Ok(json(&o))
            }
            ["resolve", "discard-local"] => {
                self.group.resolve_discard_local().map_err(refused)?;
                Ok("this site will take the primary's history when it next connects: \
                    the regions either side wrote since the split are copied"
                    .into())
            }
            ["slink", nr, "policy", p] | ["slink", "message", nr, "policy", p] => {
                let nr = parse_slink(nr).map_err(err)?;
                let pol: dmrep_formats::replicator_table::Policy = p.parse().map_err(|e| err(format!("{e}")))?;
                self.group.set_policy(nr, pol).map_err(refused)?;
                Ok(format!("slink {nr} policy {pol}"))
            }
            ["slink", nr, "fallbehind", "none"] | ["slink", "message", nr, "fallbehind", "none"] => {
                let nr = parse_slink(nr).map_err(err)?;
                self.group.set_thresholds(nr, Thresholds::default(), true).map_err(refused)?;
                Ok(format!("slink {nr} fallbehind none"))
            }
            ["slink", nr, "fallbehind", rest @ ..] | ["slink", "message", nr, "fallbehind", rest @ ..]
                if !rest.is_empty() =>
            {
                let nr = parse_slink(nr).map_err(err)?;
                let mut fb = dmrep_formats::replicator_table::FallBehind::default();
                fb.parse_into(rest).map_err(|e| err(e.to_string()))?;
                self.group.set_thresholds(nr, thresholds_of(&fb), false).map_err(refused)?;
                Ok(format!("slink {nr} fallbehind {}", fb.to_args().join(" ")))
            }
            _ => Err(err(format!(
                "unknown message {:?} (expected: stop|start, statistics on|off|reset, \
                 slink <nr> policy <p>, slink <nr> fallbehind <type>=<value>...|none, slink <nr> pause|resume, \
                 slink <nr> resync-rate <bytes/s>, slink <nr> invalidate, role, switchover <site> [timeout s], \
                 takeover [force], resolve discard-local, verify <nr> [rate=<bytes/s>] [fix], verify-status, \
                 snapshot <name> <slink>, snapshot-outcome <name> [wait ms])",
                args.join(" ")
            ))),
        }
    }

    fn companions(&self) -> Vec<(String, String)> {
        self.spec
            .devices
            .iter()
            .map(|d| {
                let dev = dmrep_formats::replicator_table::ReplicatorDevSpec {
                    control: self.name.clone(),
                    dev_nr: d.dev_nr,
                    replicas: d.replicas.clone(),
                };
                (
                    format!("{}-{}", self.name, d.dev_nr),
                    format!("0 {} {} {}\n", self.handle.dev_bytes / 512, TD, dev.to_args().join(" ")),
                )
            })
            .collect()
    }

    /// Suspending the control device holds the writes of every device of the group.
    fn presuspend(&self) {
        self.group.freeze();
    }

    fn resume(&self) {
        self.group.thaw();
        let Some(r) = self.pending.lock().take() else { return };
        for s in &self.spec.slinks {
            self.group.set_resync_snapshot(s.nr, s.resync_snapshot);
        }
        for (nr, p, t) in r.policies {
            if let Err(e) = self.group.set_policy_and_thresholds(nr, p, t) {
                tracing::warn!(group = %self.name, slink = nr, "reloaded policy not applied: {e}");
            }
        }
        for nr in r.removed {
            match self.group.remove_slink(nr) {
                Ok(()) => self.handle.declared.lock().retain(|(s, _, _)| *s != nr),
                Err(e) => tracing::warn!(group = %self.name, slink = nr, "slink not removed: {e}"),
            }
        }
        for ((dev, rep, opened), claim) in r.replacements {
            let nr = rep.slink_nr;
            let Some(h) = self.group.handler(nr) else { continue };
            // The old replica's claim goes with it, once no I/O to it is in flight.
            if let Err(e) = h.attach(dev, &rep.path, self.handle.dev_bytes) {
                tracing::warn!(group = %self.name, slink = nr, device = dev, "replacement replica not attached: {e}");
                continue;
            }
            h.keep_claim(dev, claim);
            // Its dirty log starts all dirty: the new replica is copied in full.
            let opened = opened.map(|(log, _)| (log, true));
            if let Err(e) = attach_opened(&self.group, dev, &rep, self.handle.dev_bytes, opened) {
                tracing::warn!(group = %self.name, slink = nr, device = dev, "replacement dirty log not attached: {e}");
                continue;
            }
            tracing::info!(group = %self.name, slink = nr, device = dev, path = %rep.path, "replica replaced: initial copy");
            let mut declared = self.handle.declared.lock();
            declared.retain(|(s, d, _)| !(*s == nr && *d == dev));
            declared.push((nr, dev, rep.path.clone()));
        }
        for (setup, reps) in r.new_slinks {
            let nr = setup.nr;
            let declared: Vec<_> = reps.iter().map(|(d, r, _)| (r.slink_nr, *d, r.path.clone())).collect();
            let dirty = reps
                .into_iter()
                .filter_map(|(dev, _, opened)| opened.map(|(log, initial)| (dev, log, self.handle.dev_bytes, initial)))
                .collect();
            if let Err(e) = self.group.add_slink(setup, dirty) {
                tracing::warn!(group = %self.name, slink = nr, "slink not added: {e}");
                continue;
            }
            self.handle.declared.lock().extend(declared);
        }
    }

    fn shutdown(&self) {
        // The last table using the group stops it (a reload keeps it running).
        if self.handle.users.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.handle.group.lock().take();
            self.group.shutdown();
            self.handle.claims.lock().clear();
        }
        // A reload that never became live lets go of the devices it claimed.
        self.pending.lock().take();
    }
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

fn parse_slink(s: &str) -> Result<u16, String> {
    s.parse::<u16>().map_err(|_| format!("slink number: expected an integer, found {s:?}"))
}
