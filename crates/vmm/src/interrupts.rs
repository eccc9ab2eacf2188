//! The VM's interrupt wiring: which irqchip (KVM's in-kernel PIC + IOAPIC, or the split
//! irqchip with our I/O APIC model), the one owner of KVM's GSI routing table, and the
//! devices' interrupt lines (irqfds).
//!
//! `KVM_SET_GSI_ROUTING` replaces the whole table and waits out an SRCU grace period, so
//! every change goes through [`GsiRouting`], which keeps the full table (the legacy routes
//! included) and commits a batch of changes with one call.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use devices::{IoapicRouter, MsiMessage, WarnLimiter, IOAPIC_NUM_PINS};
use kvm_bindings::{
    kvm_irq_routing_entry, kvm_msi, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

/// Where the interrupt controllers live.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IrqchipMode {
    /// Local APICs in KVM, the I/O APIC in vireo (`KVM_CAP_SPLIT_IRQCHIP`), no PIC, no PIT.
    #[default]
    Split,
    /// KVM's PIC pair, IOAPIC and PIT.
    Kernel,
}

/// Errors wiring interrupts.
#[derive(Debug, thiserror::Error)]
pub enum InterruptError {
    #[error("KVM_SET_GSI_ROUTING with {entries} routes: {source}")]
    SetRouting {
        entries: usize,
        source: kvm_ioctls::Error,
    },
    #[error("cannot build a routing table of {0} entries")]
    TableSize(usize),
    #[error("cannot register the irqfd of GSI {gsi}: {source}")]
    Irqfd { gsi: u32, source: kvm_ioctls::Error },
    #[error("cannot duplicate the interrupt eventfd of GSI {gsi}: {source}")]
    Dup { gsi: u32, source: std::io::Error },
    #[error("GSI {0} is beyond the I/O APIC's {IOAPIC_NUM_PINS} pins")]
    NoSuchPin(u32),
}

/// One route of a GSI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// A pin of an in-kernel interrupt controller.
    Irqchip {
        chip: u32,
        pin: u32,
    },
    Msi(MsiMessage),
}

impl Route {
    fn entry(self, gsi: u32) -> kvm_irq_routing_entry {
        let mut e = kvm_irq_routing_entry {
            gsi,
            ..Default::default()
        };
        match self {
            Route::Irqchip { chip, pin } => {
                e.type_ = KVM_IRQ_ROUTING_IRQCHIP;
                e.u.irqchip.irqchip = chip;
                e.u.irqchip.pin = pin;
            }
            Route::Msi(m) => {
                e.type_ = KVM_IRQ_ROUTING_MSI;
                e.u.msi.address_lo = m.address as u32;
                e.u.msi.address_hi = (m.address >> 32) as u32;
                e.u.msi.data = m.data;
            }
        }
        e
    }
}

/// Where a routing table is committed (KVM, or a recorder in tests).
pub trait RoutingSink: Send + Sync {
    fn set_gsi_routing(&self, entries: &[kvm_irq_routing_entry]) -> Result<(), InterruptError>;
}

impl RoutingSink for VmFd {
    fn set_gsi_routing(&self, entries: &[kvm_irq_routing_entry]) -> Result<(), InterruptError> {
        let table = KvmIrqRouting::from_entries(entries)
            .map_err(|_| InterruptError::TableSize(entries.len()))?;
        VmFd::set_gsi_routing(self, &table).map_err(|source| InterruptError::SetRouting {
            entries: entries.len(),
            source,
        })
    }
}

/// The one owner of the GSI routing table.
pub struct GsiRouting {
    sink: Arc<dyn RoutingSink>,
    routes: BTreeMap<u32, Vec<Route>>,
    dirty: bool,
    commits: u64,
}

impl GsiRouting {
    /// KVM's own table with the in-kernel irqchip (virt/kvm/irqchip.c default routing):
    /// GSIs 0–15 on the PIC pair and the IOAPIC, 16–23 on the IOAPIC. Kept so that adding
    /// MSI routes later (PCI) does not silence COM1 and virtio-mmio.
    pub fn kernel_irqchip(sink: Arc<dyn RoutingSink>) -> Self {
        let mut routes = BTreeMap::new();
        for gsi in 0..IOAPIC_NUM_PINS as u32 {
            let mut v = vec![Route::Irqchip {
                chip: KVM_IRQCHIP_IOAPIC,
                pin: gsi,
            }];
            if gsi < 16 {
                let chip = if gsi < 8 {
                    KVM_IRQCHIP_PIC_MASTER
                } else {
                    KVM_IRQCHIP_PIC_SLAVE
                };
                v.push(Route::Irqchip { chip, pin: gsi % 8 });
            }
            routes.insert(gsi, v);
        }
        Self {
            sink,
            routes,
            // This is what KVM already has: nothing to commit.
            dirty: false,
            commits: 0,
        }
    }

    /// An empty table (the split irqchip starts with none).
    pub fn empty(sink: Arc<dyn RoutingSink>) -> Self {
        Self {
            sink,
            routes: BTreeMap::new(),
            dirty: false,
            commits: 0,
        }
    }

    /// Makes `route` the only route of `gsi`.
    pub fn set(&mut self, gsi: u32, route: Route) {
        let new = vec![route];
        if self.routes.get(&gsi) != Some(&new) {
            self.routes.insert(gsi, new);
            self.dirty = true;
        }
    }

    pub fn remove(&mut self, gsi: u32) {
        if self.routes.remove(&gsi).is_some() {
            self.dirty = true;
        }
    }

    pub fn routes(&self, gsi: u32) -> &[Route] {
        self.routes.get(&gsi).map_or(&[], Vec::as_slice)
    }

    /// Commits what changed since the last commit with one `KVM_SET_GSI_ROUTING`.
    pub fn commit(&mut self) -> Result<(), InterruptError> {
        if !self.dirty {
            return Ok(());
        }
        let entries: Vec<kvm_irq_routing_entry> = self
            .routes
            .iter()
            .flat_map(|(&gsi, rs)| rs.iter().map(move |r| r.entry(gsi)))
            .collect();
        self.sink.set_gsi_routing(&entries)?;
        self.dirty = false;
        self.commits += 1;
        Ok(())
    }

    /// How many tables were committed.
    pub fn commits(&self) -> u64 {
        self.commits
    }
}

/// A device's interrupt line under the split irqchip: its eventfd, attached to KVM as an
/// irqfd only while the pin has a route.
struct Line {
    evt: EventFd,
    attached: bool,
}

struct SplitState {
    routing: GsiRouting,
    lines: BTreeMap<u32, Line>,
    /// Pins with a route right now.
    routed: [bool; IOAPIC_NUM_PINS],
    log: WarnLimiter,
}

/// The devices' interrupt lines and, under the split irqchip, the I/O APIC model's routes.
pub struct InterruptManager {
    vm: Arc<VmFd>,
    mode: IrqchipMode,
    routing: Arc<Mutex<SplitState>>,
}

fn lock(m: &Mutex<SplitState>) -> MutexGuard<'_, SplitState> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl InterruptManager {
    pub fn new(vm: Arc<VmFd>, mode: IrqchipMode) -> Self {
        let sink: Arc<dyn RoutingSink> = vm.clone();
        let routing = match mode {
            IrqchipMode::Kernel => GsiRouting::kernel_irqchip(sink),
            IrqchipMode::Split => GsiRouting::empty(sink),
        };
        Self {
            vm,
            mode,
            routing: Arc::new(Mutex::new(SplitState {
                routing,
                lines: BTreeMap::new(),
                routed: [false; IOAPIC_NUM_PINS],
                log: WarnLimiter::default(),
            })),
        }
    }

    pub fn mode(&self) -> IrqchipMode {
        self.mode
    }

    /// Connects a device's interrupt eventfd to `gsi`: with the in-kernel irqchip an irqfd
    /// on KVM's IOAPIC/PIC route; under the split irqchip an irqfd on the pin's MSI route
    /// whenever the guest has the pin unmasked.
    pub fn connect(&self, gsi: u32, evt: &EventFd) -> Result<(), InterruptError> {
        match self.mode {
            IrqchipMode::Kernel => self
                .vm
                .register_irqfd(evt, gsi)
                .map_err(|source| InterruptError::Irqfd { gsi, source }),
            IrqchipMode::Split => {
                if gsi as usize >= IOAPIC_NUM_PINS {
                    return Err(InterruptError::NoSuchPin(gsi));
                }
                let evt = evt
                    .try_clone()
                    .map_err(|source| InterruptError::Dup { gsi, source })?;
                let mut st = lock(&self.routing);
                let routed = st.routed[gsi as usize];
                let mut line = Line {
                    evt,
                    attached: false,
                };
                if routed {
                    self.vm
                        .register_irqfd(&line.evt, gsi)
                        .map_err(|source| InterruptError::Irqfd { gsi, source })?;
                    line.attached = true;
                }
                st.lines.insert(gsi, line);
                Ok(())
            }
        }
    }

    /// The router the I/O APIC model drives (split irqchip).
    pub fn ioapic_router(&self) -> Box<dyn IoapicRouter> {
        Box::new(SplitRouter {
            vm: self.vm.clone(),
            state: self.routing.clone(),
        })
    }

    /// Routing tables committed so far.
    pub fn commits(&self) -> u64 {
        lock(&self.routing).routing.commits()
    }
}

/// Turns the I/O APIC model's routes into KVM state: an unmasked pin gets its MSI route
/// first and then its irqfd (KVM delivers at once what the eventfd collected while it was
/// detached: the "latched while masked, delivered once" of an edge line); a masked pin
/// loses its irqfd first, then its route.
struct SplitRouter {
    vm: Arc<VmFd>,
    state: Arc<Mutex<SplitState>>,
}

impl IoapicRouter for SplitRouter {
    fn set_route(&mut self, pin: usize, route: Option<(MsiMessage, bool)>) {
        let mut st = lock(&self.state);
        let gsi = pin as u32;
        let result = match route {
            Some((msi, _level)) => {
                st.routing.set(gsi, Route::Msi(msi));
                st.routing.commit().and_then(|()| {
                    st.routed[pin] = true;
                    match st.lines.get_mut(&gsi) {
                        Some(line) if !line.attached => {
                            self.vm
                                .register_irqfd(&line.evt, gsi)
                                .map_err(|source| InterruptError::Irqfd { gsi, source })?;
                            line.attached = true;
                            Ok(())
                        }
                        _ => Ok(()),
                    }
                })
            }
            None => {
                if let Some(line) = st.lines.get_mut(&gsi) {
                    if line.attached {
                        // A failed detach leaves the line attached to a route that goes away
                        // below: its interrupts are then dropped, which masking asks for.
                        let _ = self.vm.unregister_irqfd(&line.evt, gsi);
                        line.attached = false;
                    }
                }
                st.routed[pin] = false;
                st.routing.remove(gsi);
                st.routing.commit()
            }
        };
        if let Err(e) = result {
            if st.log.allow() {
                tracing::error!("I/O APIC pin {pin}: {e}");
            }
        }
    }

    fn inject(&mut self, pin: usize, msi: MsiMessage) {
        let m = kvm_msi {
            address_lo: msi.address as u32,
            address_hi: (msi.address >> 32) as u32,
            data: msi.data,
            ..Default::default()
        };
        if let Err(e) = self.vm.signal_msi(m) {
            let mut st = lock(&self.state);
            if st.log.allow() {
                tracing::error!("I/O APIC pin {pin}: KVM_SIGNAL_MSI: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<Vec<kvm_irq_routing_entry>>>);
    impl RoutingSink for Recorder {
        fn set_gsi_routing(&self, entries: &[kvm_irq_routing_entry]) -> Result<(), InterruptError> {
            self.0.lock().unwrap().push(entries.to_vec());
            Ok(())
        }
    }

    fn msi(data: u32) -> MsiMessage {
        MsiMessage {
            address: 0xfee0_0000,
            data,
        }
    }

    #[test]
    fn changes_are_batched_into_one_commit_and_unchanged_tables_cost_nothing() {
        let rec = Arc::new(Recorder::default());
        let mut r = GsiRouting::empty(rec.clone());
        r.commit().unwrap();
        assert!(rec.0.lock().unwrap().is_empty(), "nothing to commit");
        for gsi in 24..32 {
            r.set(gsi, Route::Msi(msi(gsi)));
        }
        r.remove(25);
        r.commit().unwrap();
        assert_eq!(rec.0.lock().unwrap().len(), 1, "one call for the batch");
        assert_eq!(rec.0.lock().unwrap()[0].len(), 7);
        // Setting what is already there is no change.
        r.set(24, Route::Msi(msi(24)));
        r.commit().unwrap();
        assert_eq!(r.commits(), 1);
    }

    #[test]
    fn msi_routes_sit_beside_the_legacy_routes_of_the_in_kernel_irqchip() {
        let rec = Arc::new(Recorder::default());
        let mut r = GsiRouting::kernel_irqchip(rec.clone());
        r.commit().unwrap();
        assert_eq!(r.commits(), 0, "KVM already has its default table");
        r.set(24, Route::Msi(msi(0x41)));
        r.commit().unwrap();
        let table = rec.0.lock().unwrap()[0].clone();
        // 24 IOAPIC pins, 16 PIC pins, one MSI.
        assert_eq!(table.len(), 24 + 16 + 1);
        let com1: Vec<_> = table.iter().filter(|e| e.gsi == 4).collect();
        assert_eq!(com1.len(), 2);
        assert!(com1.iter().all(|e| e.type_ == KVM_IRQ_ROUTING_IRQCHIP));
        // SAFETY: reading the union member the entry's type says is set.
        let chips: Vec<u32> = com1
            .iter()
            .map(|e| unsafe { e.u.irqchip.irqchip })
            .collect();
        assert!(chips.contains(&KVM_IRQCHIP_IOAPIC) && chips.contains(&KVM_IRQCHIP_PIC_MASTER));
        let m = table.iter().find(|e| e.gsi == 24).unwrap();
        assert_eq!(m.type_, KVM_IRQ_ROUTING_MSI);
        // SAFETY: as above.
        assert_eq!(unsafe { m.u.msi.data }, 0x41);
        assert_eq!(
            r.routes(8).len(),
            2,
            "GSI 8 on the IOAPIC and the slave PIC"
        );
        assert_eq!(r.routes(20).len(), 1);
    }
}
