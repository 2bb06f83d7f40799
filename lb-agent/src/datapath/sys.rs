//! Raw `bpf(2)` map calls that aya 0.14 does not wrap: batch operations,
//! lookup-and-delete, and opening a pinned map read-only. Keys and values are `aya::Pod` types whose sizes match
//! the map's.

use aya::Pod;

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
const BPF_OBJ_GET: libc::c_long = 7;
/// `BPF_OBJ_GET` file flag: the fd may read the map, not write it.
const BPF_F_RDONLY: u32 = 1 << 3;

#[repr(C)]
#[derive(Default)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// Opens the map pinned at `path` read-only: the kernel refuses every
/// update and delete through the returned fd.
pub fn obj_get_rdonly(path: &std::path::Path) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in path"))?;
    let mut attr = ObjAttr {
        pathname: c.as_ptr() as u64,
        file_flags: BPF_F_RDONLY,
        ..Default::default()
    };
    // SAFETY: `attr` is a prefix of `union bpf_attr` for BPF_OBJ_GET and
    // `c` outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            (&mut attr as *mut ObjAttr).cast::<libc::c_void>(),
            std::mem::size_of::<ObjAttr>(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(rc as i32) })
}

/// Update flag: create only.
pub const BPF_NOEXIST: u64 = 1;

#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<()> {
    // SAFETY: `attr` is a live, correctly laid out prefix of `union bpf_attr`,
    // and its pointers point to buffers of the map's key and value sizes.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            (attr as *mut T).cast::<libc::c_void>(),
            std::mem::size_of::<T>(),
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn is_enoent(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOENT)
}

fn elem<K, V>(fd: i32, k: *const K, v: *const V, flags: u64) -> ElemAttr {
    ElemAttr {
        map_fd: fd as u32,
        key: k as u64,
        value: v as u64,
        flags,
        ..Default::default()
    }
}

pub fn lookup<K: Pod, V: Pod + Default>(fd: i32, k: &K) -> std::io::Result<V> {
    let mut v = V::default();
    bpf(BPF_MAP_LOOKUP_ELEM, &mut elem(fd, k, &raw mut v, 0))?;
    Ok(v)
}

pub fn lookup_and_delete<K: Pod, V: Pod + Default>(fd: i32, k: &K) -> std::io::Result<V> {
    let mut v = V::default();
    bpf(
        BPF_MAP_LOOKUP_AND_DELETE_ELEM,
        &mut elem(fd, k, &raw mut v, 0),
    )?;
    Ok(v)
}

pub fn update<K: Pod, V: Pod>(fd: i32, k: &K, v: &V, flags: u64) -> std::io::Result<()> {
    bpf(BPF_MAP_UPDATE_ELEM, &mut elem(fd, k, v, flags))
}

/// Deletes one key; `Ok(false)` if it was not there.
pub fn delete<K: Pod>(fd: i32, k: &K) -> std::io::Result<bool> {
    match bpf(
        BPF_MAP_DELETE_ELEM,
        &mut elem(fd, k, std::ptr::null::<u8>(), 0),
    ) {
        Ok(()) => Ok(true),
        Err(e) if is_enoent(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Deletes keys with `BPF_MAP_DELETE_BATCH`, `chunk` at a time; the kernel
/// stops at the first missing key, which is skipped. Returns how many were
/// deleted.
pub fn delete_batch<K: Pod>(fd: i32, keys: &[K], chunk: usize) -> std::io::Result<u64> {
    let mut deleted = 0u64;
    let mut rest = keys;
    while !rest.is_empty() {
        let part = &rest[..rest.len().min(chunk)];
        let mut a = BatchAttr {
            keys: part.as_ptr() as u64,
            count: part.len() as u32,
            map_fd: fd as u32,
            ..Default::default()
        };
        let r = bpf(BPF_MAP_DELETE_BATCH, &mut a);
        let done = (a.count as usize).min(part.len());
        deleted += done as u64;
        match r {
            Ok(()) => rest = &rest[done..],
            Err(e) if is_enoent(&e) => rest = &rest[(done + 1).min(rest.len())..],
            Err(e) => return Err(e),
        }
    }
    Ok(deleted)
}

/// Writes `keys[i] -> values[i]` with `BPF_MAP_UPDATE_BATCH`, `chunk` at a time.
pub fn update_batch<K: Pod, V: Pod>(
    fd: i32,
    keys: &[K],
    values: &[V],
    chunk: usize,
) -> std::io::Result<()> {
    assert_eq!(keys.len(), values.len());
    for (k, v) in keys.chunks(chunk).zip(values.chunks(chunk)) {
        let mut a = BatchAttr {
            keys: k.as_ptr() as u64,
            values: v.as_ptr() as u64,
            count: k.len() as u32,
            map_fd: fd as u32,
            ..Default::default()
        };
        bpf(BPF_MAP_UPDATE_BATCH, &mut a)?;
        if a.count as usize != k.len() {
            return Err(std::io::Error::other(format!(
                "batch update wrote {} of {} entries",
                a.count,
                k.len()
            )));
        }
    }
    Ok(())
}

/// Walks a whole map with `BPF_MAP_LOOKUP_BATCH`, `batch` entries at a time
/// (grown when one hash bucket holds more). Entries added or removed during
/// the walk may or may not be seen. Returns the number visited.
pub fn for_each_batch<K: Pod + Default, V: Pod + Default>(
    fd: i32,
    batch: usize,
    mut f: impl FnMut(&K, &V),
) -> std::io::Result<u64> {
    let mut n = batch.max(1);
    let mut keys = vec![K::default(); n];
    let mut vals = vec![V::default(); n];
    // The batch token is a key-sized opaque value for hash maps, a u32 for arrays.
    let mut token_in = vec![0u8; std::mem::size_of::<K>().max(8)];
    let mut token_out = token_in.clone();
    let mut first = true;
    let mut seen = 0u64;
    loop {
        let mut a = BatchAttr {
            in_batch: if first { 0 } else { token_in.as_ptr() as u64 },
            out_batch: token_out.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: vals.as_mut_ptr() as u64,
            count: n as u32,
            map_fd: fd as u32,
            ..Default::default()
        };
        let r = bpf(BPF_MAP_LOOKUP_BATCH, &mut a);
        let got = (a.count as usize).min(n);
        let done = match r {
            Ok(()) => false,
            Err(e) if is_enoent(&e) => true,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && got == 0 => {
                n *= 2;
                keys.resize(n, K::default());
                vals.resize(n, V::default());
                continue;
            }
            Err(e) => return Err(e),
        };
        for i in 0..got {
            f(&keys[i], &vals[i]);
        }
        seen += got as u64;
        if done || got == 0 {
            return Ok(seen);
        }
        token_in.copy_from_slice(&token_out);
        first = false;
    }
}

/// Every value of a per-CPU array of `count` entries of `V` on `cpus` CPUs,
/// in one `BPF_MAP_LOOKUP_BATCH` (per-key lookups take `count` syscalls:
/// about 1 ms for 1,024 here, far more under emulation). `f` sees each
/// entry's value on each CPU.
pub fn for_each_percpu_value<V: Pod>(
    fd: i32,
    count: u32,
    cpus: usize,
    mut f: impl FnMut(&V),
) -> std::io::Result<()> {
    let stride = std::mem::size_of::<V>().next_multiple_of(8);
    let n = count as usize;
    let mut keys = vec![0u32; n];
    let mut vals = vec![0u8; n * cpus * stride];
    let mut token_out = [0u8; 8];
    let mut a = BatchAttr {
        out_batch: token_out.as_mut_ptr() as u64,
        keys: keys.as_mut_ptr() as u64,
        values: vals.as_mut_ptr() as u64,
        count,
        map_fd: fd as u32,
        ..Default::default()
    };
    match bpf(BPF_MAP_LOOKUP_BATCH, &mut a) {
        Ok(()) => {}
        Err(e) if is_enoent(&e) => {}
        Err(e) => return Err(e),
    }
    let got = (a.count as usize).min(n);
    if got != n {
        return Err(std::io::Error::other(format!(
            "batch lookup read {got} of {n} entries"
        )));
    }
    for i in 0..n * cpus {
        // SAFETY: `vals` holds n * cpus values of `stride` >= size_of::<V>() bytes; V is Pod.
        let v = unsafe { std::ptr::read_unaligned(vals[i * stride..].as_ptr() as *const V) };
        f(&v);
    }
    Ok(())
}
