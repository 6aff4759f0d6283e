//! Validation rules and canonical rendering.

use super::*;

// ---------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------

/// The rules for one device's replicas (shared by both targets).
pub(super) fn validate_replicas(dev_nr: u32, replicas: &[ReplicaSpec]) -> Result<(), ReplicatorTableError> {
    for (i, r) in replicas.iter().enumerate() {
        if replicas[..i].iter().any(|o| o.slink_nr == r.slink_nr) {
            return Err(ReplicatorTableError::DuplicateReplica { slink: r.slink_nr, dev_nr });
        }
    }
    if !replicas.iter().any(|r| r.slink_nr == 0) {
        return Err(ReplicatorTableError::NoLocalDevice { dev_nr });
    }
    let mut first_region: Option<(SlinkNr, u64)> = None;
    for r in replicas {
        let ctx = format!("slink {} device {dev_nr}", r.slink_nr);
        if !slink_nr_ok(r.slink_nr.into()) {
            return Err(invalid(&ctx, "slink_nr", slink_nr_expected(), Some(&r.slink_nr.to_string())));
        }
        if r.path.is_empty() {
            return Err(invalid(&ctx, "dev_path", "a path", Some("")));
        }
        match (&r.dirty_log, r.slink_nr) {
            (DirtyLogSpec::None, 0) => {}
            (other, 0) => return Err(ReplicatorTableError::LocalDirtyLog { dev_nr, found: other.name() }),
            (DirtyLogSpec::None, slink) => return Err(ReplicatorTableError::MissingDirtyLog { slink, dev_nr }),
            _ => {}
        }
        if let DirtyLogSpec::Disk { path, .. } = &r.dirty_log {
            if path.is_empty() {
                return Err(invalid(&ctx, "dirty log path", "a path", Some("")));
            }
        }
        if let Some(region) = r.dirty_log.region_sectors() {
            if region < MIN_REGION_SECTORS || !region.is_power_of_two() {
                return Err(invalid(
                    &ctx,
                    "region_sectors",
                    format!("a power of two >= {MIN_REGION_SECTORS} (sectors)"),
                    Some(&region.to_string()),
                ));
            }
            match first_region {
                None => first_region = Some((r.slink_nr, region)),
                Some((first_slink, expected)) if expected != region => {
                    return Err(ReplicatorTableError::RegionSizeMismatch {
                        dev_nr,
                        slink: r.slink_nr,
                        found: region,
                        first_slink,
                        expected,
                    })
                }
                Some(_) => {}
            }
        }
    }
    Ok(())
}

impl ReplicatorSpec {
    /// Checks every rule of the grammar (the parser calls this; use it on specs
    /// built in code before rendering them).
    pub fn validate(&self) -> Result<(), ReplicatorTableError> {
        for (i, s) in self.slinks.iter().enumerate() {
            if !slink_nr_ok(s.nr.into()) {
                return Err(invalid(
                    format!("slink {}", s.nr),
                    "slink_nr",
                    slink_nr_expected(),
                    Some(&s.nr.to_string()),
                ));
            }
            if self.slinks[..i].iter().any(|o| o.nr == s.nr) {
                return Err(ReplicatorTableError::DuplicateSlink { slink: s.nr });
            }
            if s.policy.mode == Mode::Synchronous && !s.fallbehind.is_empty() {
                return Err(ReplicatorTableError::SyncWithFallBehind {
                    slink: s.nr,
                    found: s.fallbehind.to_args().join(" "),
                });
            }
            let params = s.kind.params();
            if let Some(p) = params.iter().find(|p| p.is_empty()) {
                return Err(invalid(
                    format!("slink {}", s.nr),
                    "transport parameter",
                    "a non-empty parameter",
                    Some(p),
                ));
            }
            if !params.is_empty() && is_threshold(params, 0) {
                return Err(with_note(
                    invalid(
                        format!("slink {}", s.nr),
                        "transport parameter",
                        "a parameter that is not a fall-behind threshold",
                        Some(&params[0]),
                    ),
                    "the first transport parameter would be read as a threshold",
                ));
            }
        }
        if !self.slinks.iter().any(|s| s.nr == 0) {
            return Err(ReplicatorTableError::MissingSlink0);
        }
        for (i, d) in self.devices.iter().enumerate() {
            if self.devices[..i].iter().any(|o| o.dev_nr == d.dev_nr) {
                return Err(ReplicatorTableError::DuplicateDevice { dev_nr: d.dev_nr });
            }
            for r in &d.replicas {
                if !self.slinks.iter().any(|s| s.nr == r.slink_nr) {
                    return Err(ReplicatorTableError::UndefinedSlink { slink: r.slink_nr, dev_nr: d.dev_nr });
                }
            }
            validate_replicas(d.dev_nr, &d.replicas)?;
        }
        if !self.devices.is_empty() {
            for s in &self.slinks {
                let used = self.devices.iter().any(|d| d.replicas.iter().any(|r| r.slink_nr == s.nr));
                if !used {
                    return Err(ReplicatorTableError::SlinkWithoutDevice { slink: s.nr });
                }
            }
        }
        Ok(())
    }

    /// True for the two-target form's control device (no devices).
    pub fn is_control_form(&self) -> bool {
        self.devices.is_empty()
    }

    pub fn slink(&self, nr: SlinkNr) -> Option<&SlinkSpec> {
        self.slinks.iter().find(|s| s.nr == nr)
    }

    pub fn device(&self, dev_nr: u32) -> Option<&DeviceSpec> {
        self.devices.iter().find(|d| d.dev_nr == dev_nr)
    }

    /// Canonical tokens (the arguments after `replicator`); see the module
    /// documentation.
    pub fn to_args(&self) -> Vec<String> {
        let mut out = self.log.to_args();
        let mut slinks: Vec<&SlinkSpec> = self.slinks.iter().collect();
        slinks.sort_by_key(|s| s.nr);
        let mut devices: Vec<&DeviceSpec> = self.devices.iter().collect();
        devices.sort_by_key(|d| d.dev_nr);
        for s in slinks {
            if self.devices.is_empty() {
                out.extend(s.to_args());
                continue;
            }
            for d in &devices {
                for r in d.replicas.iter().filter(|r| r.slink_nr == s.nr) {
                    out.extend(s.to_args());
                    out.extend(["2".to_string(), d.dev_nr.to_string(), r.path.clone()]);
                    out.extend(r.dirty_log.to_args());
                }
            }
        }
        out
    }
}

impl LogSpec {
    /// Canonical tokens: `<type> <#> <path> <start> <mode> [<size>]`.
    pub fn to_args(&self) -> Vec<String> {
        let mut p = vec![self.path.clone(), self.start_sector.to_string(), self.open_mode.name().to_string()];
        if let Some(n) = self.size_sectors {
            p.push(n.to_string());
        }
        if let Some(r) = self.role {
            p.push(format!("role={}", r.name()));
        }
        let mut out = vec![self.kind.name().to_string(), p.len().to_string()];
        out.extend(p);
        out
    }
}

impl SlinkSpec {
    /// Canonical tokens: `<type> <#> <nr> <policy> [<fallbehind>...] [<transport>...]`.
    pub fn to_args(&self) -> Vec<String> {
        let mut p = vec![self.nr.to_string(), self.policy.to_string()];
        p.extend(self.fallbehind.to_args());
        if self.resync_snapshot {
            p.push(RESYNC_SNAPSHOT.to_string());
        }
        p.extend(self.kind.params().iter().cloned());
        let mut out = vec![self.kind.name().to_string(), p.len().to_string()];
        out.extend(p);
        out
    }
}

impl ReplicatorDevSpec {
    /// Checks every rule of the grammar (the parser calls this).
    pub fn validate(&self) -> Result<(), ReplicatorTableError> {
        if self.control.is_empty() {
            return Err(invalid(
                "replicator-dev",
                "control_dev",
                "the name of the replicator control device",
                Some(""),
            ));
        }
        validate_replicas(self.dev_nr, &self.replicas)
    }

    /// Canonical tokens (the arguments after `replicator-dev`).
    pub fn to_args(&self) -> Vec<String> {
        let mut out = vec![self.control.clone(), self.dev_nr.to_string()];
        let mut replicas: Vec<&ReplicaSpec> = self.replicas.iter().collect();
        replicas.sort_by_key(|r| r.slink_nr);
        for r in replicas {
            out.extend([r.slink_nr.to_string(), "1".to_string(), r.path.clone()]);
            out.extend(r.dirty_log.to_args());
        }
        out
    }
}

impl fmt::Display for ReplicatorSpec {
    /// The canonical tokens joined by single spaces.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_args().join(" "))
    }
}

impl fmt::Display for ReplicatorDevSpec {
    /// The canonical tokens joined by single spaces.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_args().join(" "))
    }
}
