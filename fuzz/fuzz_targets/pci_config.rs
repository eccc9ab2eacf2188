#![no_main]

use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: vireo_fuzz::CountingAlloc = vireo_fuzz::CountingAlloc;

fuzz_target!(|data: &[u8]| {
    vireo_fuzz::bounded(vireo_fuzz::HEAP_LIMIT, data, pci::fuzz_targets::pci_config);
});
