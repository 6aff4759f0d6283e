//! The `replicator-dev` target: one replicated device of a group.

use super::*;

/// A replicated device of a group.
pub struct ReplicatorDev {
    group: Arc<Group>,
    dev_nr: u32,
    attached: Vec<u16>,
    replicas: Vec<ReplicaSpec>,
}

pub fn construct_dev(ctx: &BuildContext<'_>, seg: &SegmentSpec) -> Result<Arc<dyn Target>, TargetError> {
    let spec = parse_replicator_dev(&seg.args).map_err(|e| TargetError::params(TD, e.to_string()))?;
    let handle = ctx.devices.lookup::<GroupHandle>(&spec.control).ok_or_else(|| {
        TargetError::params(
            TD,
            format!("control device {:?} not found (create its replicator table first)", spec.control),
        )
    })?;
    let group = handle
        .group()
        .ok_or_else(|| TargetError::params(TD, format!("control device {:?} is shut down", spec.control)))?;
    let len = sectors_to_bytes(seg.len);
    for nr in group.slink_numbers() {
        if !spec.replicas.iter().any(|r| r.slink_nr == nr) {
            return Err(TargetError::params(
                TD,
                format!("device {}: no device on slink {nr} of group {}", spec.dev_nr, spec.control),
            ));
        }
    }
    let mut attached = Vec::new();
    let claiming = Claiming::new(ctx.devices.claims(), &ctx.owner, &spec.control);
    for r in &spec.replicas {
        let h = group.handler(r.slink_nr).ok_or_else(|| {
            TargetError::params(TD, format!("slink {} is not defined in control device {}", r.slink_nr, spec.control))
        })?;
        let declared =
            handle.declared.lock().iter().any(|(s, d, p)| *s == r.slink_nr && *d == spec.dev_nr && *p == r.path);
        if !declared {
            if h.has_device(spec.dev_nr) {
                return Err(TargetError::params(
                    TD,
                    format!(
                        "device {} on slink {} is already attached to group {}",
                        spec.dev_nr, r.slink_nr, spec.control
                    ),
                ));
            }
            if missing_rd(ctx, r.slink_nr, &r.path) {
                h.attach_missing(spec.dev_nr, &r.path, len);
            } else if let Err(e) = claiming.device(r.slink_nr, spec.dev_nr, &r.path, len).and_then(|c| {
                h.attach(spec.dev_nr, &r.path, len)?;
                // Held while the device is attached: an LD leaves its group only
                // once SLINK 0 has every entry of it, after this table is gone.
                h.keep_claim(spec.dev_nr, c);
                Ok(())
            }) {
                for nr in &attached {
                    if let Some(h) = group.handler(*nr) {
                        h.detach(spec.dev_nr);
                    }
                }
                return Err(e);
            }
            attached.push(r.slink_nr);
            if let Err(e) = attach_dirty(&group, spec.dev_nr, r, len, handle.fresh_log || !ctx.restoring, &claiming) {
                for nr in &attached {
                    if let Some(h) = group.handler(*nr) {
                        h.detach(spec.dev_nr);
                    }
                }
                group.remove_device(spec.dev_nr);
                return Err(e);
            }
        }
    }
    group.kick();
    claiming.accept();
    Ok(Arc::new(ReplicatorDev { group, dev_nr: spec.dev_nr, attached, replicas: spec.replicas }))
}

impl Target for ReplicatorDev {
    fn read_only(&self) -> bool {
        self.group.site().role == dmrep_formats::replog::SiteRole::Secondary
    }

    fn type_name(&self) -> &'static str {
        TD
    }

    fn submit(&self, mut req: Request, done: Completion) {
        match req.op {
            Op::Read => {
                let r = self.group.read(self.dev_nr, req.offset, &mut req.buf);
                done.complete(req, r)
            }
            // Every acknowledged write is durable in the log already.
            Op::Flush => done.complete(req, Ok(())),
            Op::Write { .. } | Op::WriteZeroes { .. } | Op::Discard => self.group.submit_write(self.dev_nr, req, done),
        }
    }

    fn supports_discard(&self) -> bool {
        true
    }

    fn status(&self) -> TargetStatus {
        let st = self.group.status();
        let mut line = String::new();
        let mut slinks = Vec::new();
        // Every SLINK of the group, those added to it live (by a reload) included.
        for s in &st.slinks {
            let nr = s.slink;
            let r = self.replicas.iter().find(|r| r.slink_nr == nr);
            let path =
                r.map(|r| r.path.clone()).or_else(|| self.group.handler(nr).and_then(|h| h.device_path(self.dev_nr)));
            let dirty_kind = match r {
                Some(r) => Some(r.dirty_log.name()),
                None => self.group.dirty_log_kind(nr, self.dev_nr),
            };
            let acc = s.accessible;
            let (insync, total) = match self.group.device_regions(nr, self.dev_nr) {
                Some((dirty, total)) => (total - dirty, total),
                None => (0, 0),
            };
            let ordered = s.sync.ordered;
            let resyncing = s.sync.state == "resyncing";
            if !line.is_empty() {
                line.push(' ');
            }
            if nr == 0 {
                line.push_str(&format!("0:{},-", if acc { "A" } else { "D" }));
            } else {
                line.push_str(&format!(
                    "{}:{},{insync}{}/{total}",
                    nr,
                    if acc { "A" } else { "D" },
                    if resyncing { "+" } else { "" }
                ));
            }
            slinks.push(serde_json::json!({
                "slink": nr,
                "device": path,
                "accessible": acc,
                "dirty_log": dirty_kind,
                "regions_in_sync": insync,
                "regions": total,
                "write_order_consistent": ordered,
                "resyncing": resyncing,
            }));
        }
        TargetStatus::new(line, serde_json::json!({ "group": st.group, "dev_nr": self.dev_nr, "slinks": slinks }))
    }

    fn cancel(&self) {
        self.group.cancel_device(self.dev_nr);
    }

    fn shutdown(&self) {
        // A device this table attached leaves the group (its LD once SLINK 0 has every
        // entry of it); the paper form's companions leave with their control device.
        if !self.attached.is_empty() {
            self.group.remove_device(self.dev_nr);
        }
    }
}
