//! Giving back the pages of start-up code once the agent runs.
//!
//! An idle agent's resident memory is mostly code mapped from files: the
//! pages of its binary and of libc that it ran, each mapped with its
//! neighbours (on a fault the kernel maps the 64 KiB around the page, or
//! the whole page-cache folio that holds it). What only start-up ran
//! (parsing arguments and `agent.yaml`, the TLS set-up, enrollment, the
//! Docker clean-up, the dynamic linker's relocations) would stay mapped,
//! and counted in the agent's RSS, for as long as it runs.
//!
//! Key design decision: once started, the agent drops its mappings of the
//! read-only segments of its binary and libraries (`MADV_DONTNEED`). They
//! are file-backed and never written, so nothing is lost: the pages stay in
//! the page cache (reclaimable, like any unmapped file data), and what the
//! agent runs next is mapped again on first use, at the cost of a minor
//! fault per 64 KiB. Only the agent's own process does this
//! (`RunOptions::release_startup_code`), not `drover up`, which runs the
//! agent inside the server. (A debugger attached before that moment loses
//! the breakpoints it wrote into those pages.)

/// Drops this process's mappings of the read-only segments of the
/// executable and of the libraries loaded from files, and returns how many
/// bytes of mappings it dropped. Objects with text relocations (whose
/// read-only pages were written at load) are left alone.
#[cfg(all(target_os = "linux", target_env = "gnu", target_pointer_width = "64"))]
#[allow(unsafe_code)]
pub fn release_startup_code() -> usize {
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    // SAFETY: dl_iterate_phdr calls `collect` once per loaded object, with
    // a pointer to the object's info that is valid during the call and the
    // `data` pointer given here, which points to `ranges`, alive and not
    // otherwise borrowed until dl_iterate_phdr returns.
    unsafe {
        libc::dl_iterate_phdr(
            Some(collect),
            (&mut ranges as *mut Vec<(usize, usize)>).cast(),
        );
    }
    let mut released = 0;
    for (start, end) in ranges {
        // SAFETY: [start, end) is whole pages of a read-only PT_LOAD segment
        // that the loader mapped privately from a file and that nobody
        // wrote (no text relocations): MADV_DONTNEED drops the mappings,
        // and the next access maps the same file pages again.
        let rc =
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
        if rc == 0 {
            released += end - start;
        }
    }
    released
}

/// Elsewhere nothing is released.
#[cfg(not(all(target_os = "linux", target_env = "gnu", target_pointer_width = "64")))]
pub fn release_startup_code() -> usize {
    0
}

/// `DT_TEXTREL`, `DT_FLAGS` and its `DF_TEXTREL` bit (elf.h).
#[cfg(all(target_os = "linux", target_env = "gnu", target_pointer_width = "64"))]
const DT_TEXTREL: i64 = 22;
#[cfg(all(target_os = "linux", target_env = "gnu", target_pointer_width = "64"))]
const DT_FLAGS: i64 = 30;
#[cfg(all(target_os = "linux", target_env = "gnu", target_pointer_width = "64"))]
const DF_TEXTREL: u64 = 0x4;

/// Adds to the `Vec<(usize, usize)>` behind `data` the page ranges of the
/// object's read-only, file-backed segments.
#[cfg(all(target_os = "linux", target_env = "gnu", target_pointer_width = "64"))]
#[allow(unsafe_code)]
unsafe extern "C" fn collect(
    info: *mut libc::dl_phdr_info,
    _size: libc::size_t,
    data: *mut libc::c_void,
) -> libc::c_int {
    // SAFETY: both pointers come from dl_iterate_phdr, see
    // `release_startup_code`; the program headers it points to are mapped
    // for the life of the object.
    let (info, ranges, headers) = unsafe {
        let info = &*info;
        (
            info,
            &mut *data.cast::<Vec<(usize, usize)>>(),
            std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum)),
        )
    };
    // The executable (no name) and the libraries loaded from files, not the
    // vDSO.
    let from_file = info.dlpi_name.is_null() || {
        // SAFETY: a non-null name is a NUL-terminated string of the loader.
        let name = unsafe { std::ffi::CStr::from_ptr(info.dlpi_name) }.to_bytes();
        name.is_empty() || name.starts_with(b"/")
    };
    if !from_file || headers.is_empty() {
        return 0;
    }
    let base = info.dlpi_addr as usize;
    for h in headers.iter().filter(|h| h.p_type == libc::PT_DYNAMIC) {
        // SAFETY: PT_DYNAMIC locates the object's dynamic section, mapped
        // for its life: (tag, value) pairs up to a DT_NULL tag.
        let mut entry = (base + h.p_vaddr as usize) as *const (i64, u64);
        loop {
            let (tag, value) = unsafe { entry.read() };
            if tag == 0 {
                break;
            }
            if tag == DT_TEXTREL || (tag == DT_FLAGS && value & DF_TEXTREL != 0) {
                return 0;
            }
            entry = unsafe { entry.add(1) };
        }
    }
    let page = page_size();
    for h in headers {
        let read_only_file =
            h.p_type == libc::PT_LOAD && h.p_flags & libc::PF_W == 0 && h.p_memsz == h.p_filesz;
        if !read_only_file {
            continue;
        }
        let start = base + h.p_vaddr as usize;
        let end = start + h.p_memsz as usize;
        // Whole pages only: a page shared with a writable segment stays.
        let (start, end) = (start.next_multiple_of(page), end / page * page);
        if start < end {
            ranges.push((start, end));
        }
    }
    0
}

#[cfg(all(target_os = "linux", target_env = "gnu", target_pointer_width = "64"))]
#[allow(unsafe_code)]
fn page_size() -> usize {
    // SAFETY: sysconf(3) only reads a system setting.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size)
        .ok()
        .filter(|s| *s > 0)
        .unwrap_or(4096)
}

#[cfg(all(
    test,
    target_os = "linux",
    target_env = "gnu",
    target_pointer_width = "64"
))]
#[allow(clippy::unwrap_used)]
mod tests {
    /// `RssFile` of this process, in KiB.
    fn rss_file_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("RssFile:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    #[test]
    fn releases_mapped_code_and_runs_on() {
        let before = rss_file_kib();
        let released = super::release_startup_code();
        let after = rss_file_kib();
        assert!(released > 0);
        assert!(after < before, "RssFile {before} KiB -> {after} KiB");
        // What runs next is mapped again from the files.
        let text = format!("{:?}", std::collections::BTreeMap::from([(1, "one")]));
        assert_eq!(text, "{1: \"one\"}");
        assert!(rss_file_kib() > 0);
    }
}
