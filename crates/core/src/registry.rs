//! Registries: the mapped devices by name, and the target types by keyword.

use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use dmrep_formats::table::SegmentSpec;
use parking_lot::{Mutex, RwLock};

use crate::claims::{Claim, Claims, Owner};
use crate::device::MappedDevice;
use crate::target::{Target, TargetError};

/// What a target constructor gets besides its segment.
pub struct BuildContext<'a> {
    /// The device the table is for.
    pub device_name: &'a str,
    /// All devices (a `replicator-dev` finds its control device here).
    pub devices: &'a DeviceRegistry,
    /// The table is one the daemon restores at start-up (it was live before), not one
    /// an operator creates now: a replica it names is not new to its group.
    pub restoring: bool,
    /// Who this table's claims belong to: the device, and this table (a new scope per
    /// build, so that a reload may claim what the live table holds).
    pub owner: Owner,
}

impl<'a> BuildContext<'a> {
    /// The context of one table build for `device_name` (not `restoring`).
    pub fn new(device_name: &'a str, devices: &'a DeviceRegistry) -> Self {
        BuildContext { device_name, devices, restoring: false, owner: Owner::new(device_name) }
    }

    /// Claim bytes `range` of the file at `path` for this table's `role` (DESIGN 4.9).
    /// Keep the guard as long as the target uses the file.
    pub fn claim(&self, path: &str, range: Range<u64>, role: impl Into<String>) -> Result<Claim, TargetError> {
        Ok(self.devices.claims().claim(&self.owner, role, Path::new(path), range)?)
    }
}

/// Builds one target from its segment (length and parameters).
pub type TargetConstructor = fn(&BuildContext<'_>, &SegmentSpec) -> Result<Arc<dyn Target>, TargetError>;

/// Target types by table keyword. Adding a target is one `register` line.
#[derive(Default, Clone)]
pub struct TargetRegistry {
    types: BTreeMap<&'static str, TargetConstructor>,
}

impl TargetRegistry {
    pub fn register(&mut self, name: &'static str, ctor: TargetConstructor) {
        self.types.insert(name, ctor);
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.types.keys().copied().collect()
    }

    pub fn build(&self, ctx: &BuildContext<'_>, seg: &SegmentSpec) -> Result<Arc<dyn Target>, TargetError> {
        match self.types.get(seg.target.as_str()) {
            Some(ctor) => ctor(ctx, seg),
            None => Err(TargetError::UnknownType(seg.target.clone(), self.names().join(", "))),
        }
    }
}

/// Errors of the device registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("device {0} already exists")]
    Exists(String),
    #[error("device {0} not found")]
    NotFound(String),
    #[error("invalid device name {0:?}: use 1-127 characters of [A-Za-z0-9._+-], not starting with '.' or '-'")]
    BadName(String),
}

/// Whether `name` is usable as a device (and NBD export) name.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 128
        && !name.starts_with('.')
        && !name.starts_with('-')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "._+-".contains(c))
}

/// The mapped devices, by name, plus shared objects that targets publish for each
/// other (a replicator control device publishes its group under its device name), and
/// the claims their targets hold on files.
#[derive(Default)]
pub struct DeviceRegistry {
    devices: RwLock<BTreeMap<String, Arc<MappedDevice>>>,
    shared: Mutex<HashMap<String, Arc<dyn Any + Send + Sync>>>,
    claims: Arc<Claims>,
}

impl DeviceRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Who uses which bytes of which file: one registry for all devices.
    pub fn claims(&self) -> &Arc<Claims> {
        &self.claims
    }

    pub fn get(&self, name: &str) -> Option<Arc<MappedDevice>> {
        self.devices.read().get(name).cloned()
    }

    pub fn list(&self) -> Vec<Arc<MappedDevice>> {
        self.devices.read().values().cloned().collect()
    }

    /// Add a new, empty device.
    pub fn insert(&self, name: &str, uuid: Option<String>) -> Result<Arc<MappedDevice>, RegistryError> {
        if !valid_name(name) {
            return Err(RegistryError::BadName(name.to_string()));
        }
        let mut devs = self.devices.write();
        if devs.contains_key(name) {
            return Err(RegistryError::Exists(name.to_string()));
        }
        let dev = MappedDevice::new(name, uuid);
        devs.insert(name.to_string(), dev.clone());
        Ok(dev)
    }

    /// Take a device out of the registry (the caller shuts it down).
    pub fn take(&self, name: &str) -> Result<Arc<MappedDevice>, RegistryError> {
        self.devices.write().remove(name).ok_or_else(|| RegistryError::NotFound(name.to_string()))
    }

    pub fn rename(&self, old: &str, new: &str) -> Result<(), RegistryError> {
        if !valid_name(new) {
            return Err(RegistryError::BadName(new.to_string()));
        }
        let mut devs = self.devices.write();
        if devs.contains_key(new) {
            return Err(RegistryError::Exists(new.to_string()));
        }
        let dev = devs.remove(old).ok_or_else(|| RegistryError::NotFound(old.to_string()))?;
        dev.set_name(new);
        devs.insert(new.to_string(), dev);
        self.claims.rename_device(old, new);
        Ok(())
    }

    /// Publish an object for other targets under `key`.
    pub fn publish(&self, key: &str, obj: Arc<dyn Any + Send + Sync>) {
        self.shared.lock().insert(key.to_string(), obj);
    }

    pub fn unpublish(&self, key: &str) {
        self.shared.lock().remove(key);
    }

    /// Look up a published object of type `T`.
    pub fn lookup<T: Any + Send + Sync>(&self, key: &str) -> Option<Arc<T>> {
        self.shared.lock().get(key).cloned().and_then(|o| o.downcast::<T>().ok())
    }
}
