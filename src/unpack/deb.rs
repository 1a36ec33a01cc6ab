//! Reading a `.deb` container: the ar archive, `debian-binary`, the control members, and a
//! streaming decompressor for `data.tar.*`.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use super::{ControlMember, ControlMembers, Ctx, UnpackError};

/// Buffer size for reading the `.deb` file and the decompressed tar stream.
pub(crate) const BUF: usize = 256 * 1024;

const AR_MAGIC: &[u8; 8] = b"!<arch>\n";

/// Consumer of the decompressed `data.tar` stream (it also sees the control members).
pub(crate) type DataFn<'f> =
    dyn FnMut(&mut dyn Read, &ControlMembers) -> Result<(), UnpackError> + 'f;

/// Compressed tar member kinds we accept, by ar member name suffix.
fn decoder<'a, R: Read + 'a>(
    ctx: &Ctx,
    member: &str,
    suffix: &str,
    r: R,
) -> Result<Box<dyn Read + 'a>, UnpackError> {
    Ok(match suffix {
        "" => Box::new(r),
        ".gz" => Box::new(flate2::read::MultiGzDecoder::new(r)),
        ".xz" => Box::new(liblzma::read::XzDecoder::new_multi_decoder(r)),
        ".lzma" => {
            let stream = liblzma::stream::Stream::new_lzma_decoder(u64::MAX)
                .map_err(|e| ctx.io(format!("setting up the {member} decoder"), e.into()))?;
            Box::new(liblzma::read::XzDecoder::new_stream(r, stream))
        }
        ".zst" => Box::new(
            zstd::stream::read::Decoder::new(r)
                .map_err(|e| ctx.io(format!("setting up the {member} decoder"), e))?,
        ),
        ".bz2" => Box::new(bzip2::read::MultiBzDecoder::new(r)),
        other => {
            return Err(ctx.format(format!(
                "member {member}: unsupported compression {other:?}"
            )))
        }
    })
}

/// Opens `deb`, checks the ar magic and `debian-binary`, reads the control members and, if
/// `data` is given, hands it the decompressed `data.tar` stream.
pub(crate) fn read_deb(
    ctx: &Ctx,
    deb: &Path,
    mut data: Option<&mut DataFn<'_>>,
) -> Result<ControlMembers, UnpackError> {
    let file = File::open(deb).map_err(|e| ctx.io("opening the .deb".into(), e))?;
    let mut reader = BufReader::with_capacity(BUF, file);
    let mut magic = [0u8; 8];
    reader
        .read_exact(&mut magic)
        .map_err(|e| ctx.format(format!("not a Debian package: cannot read ar magic: {e}")))?;
    if &magic != AR_MAGIC {
        return Err(ctx.format("not a Debian package: bad ar magic".into()));
    }
    reader
        .seek(SeekFrom::Start(0))
        .map_err(|e| ctx.io("seeking".into(), e))?;
    let mut ar = ar::Archive::new(reader);

    // debian-binary must come first.
    match ar.next_entry() {
        None => return Err(ctx.format("empty ar archive (no debian-binary member)".into())),
        Some(Err(e)) => return Err(ctx.io("reading the first ar member".into(), e)),
        Some(Ok(mut entry)) => {
            let name = entry.header().identifier().to_vec();
            if name != b"debian-binary" {
                return Err(ctx.format(format!(
                    "first member is {:?}, not debian-binary",
                    String::from_utf8_lossy(&name)
                )));
            }
            let mut v = Vec::new();
            entry
                .by_ref()
                .take(64)
                .read_to_end(&mut v)
                .map_err(|e| ctx.io("reading debian-binary".into(), e))?;
            if !v.starts_with(b"2.") {
                return Err(ctx.format(format!(
                    "unsupported format version {:?} in debian-binary",
                    String::from_utf8_lossy(&v).trim()
                )));
            }
        }
    }

    let mut control: Option<ControlMembers> = None;
    loop {
        let mut entry = match ar.next_entry() {
            None => break,
            Some(Err(e)) => return Err(ctx.io("reading the ar archive".into(), e)),
            Some(Ok(entry)) => entry,
        };
        let name = String::from_utf8_lossy(entry.header().identifier()).into_owned();
        if name.starts_with('_') {
            continue;
        }
        if let Some(suffix) = name.strip_prefix("control.tar") {
            if control.is_some() {
                return Err(ctx.format("two control.tar members".into()));
            }
            let dec = decoder(ctx, &name, suffix, &mut entry)?;
            control = Some(read_control_tar(ctx, &name, dec)?);
            if data.is_none() {
                break;
            }
        } else if let Some(suffix) = name.strip_prefix("data.tar") {
            let Some(c) = control.as_ref() else {
                return Err(ctx.format("data.tar member before control.tar".into()));
            };
            let dec = decoder(ctx, &name, suffix, &mut entry)?;
            let mut buffered = BufReader::with_capacity(BUF, dec);
            if let Some(f) = data.as_mut() {
                f(&mut buffered, c)?;
            }
            return Ok(control.expect("checked above"));
        } else if control.is_none() {
            return Err(ctx.format(format!("unexpected member {name:?} before control.tar")));
        }
        // Unknown members after control.tar are ignored (deb(5)).
    }
    match control {
        None => Err(ctx.format("missing control.tar member".into())),
        Some(_) if data.is_some() => Err(ctx.format("missing data.tar member".into())),
        Some(c) => Ok(c),
    }
}

fn read_control_tar(
    ctx: &Ctx,
    member: &str,
    r: Box<dyn Read + '_>,
) -> Result<ControlMembers, UnpackError> {
    let mut tar = tar::Archive::new(r);
    let mut control = None;
    let mut members = Vec::new();
    let err = |e: std::io::Error| ctx.io(format!("reading {member}"), e);
    for entry in tar.entries().map_err(err)? {
        let mut entry = entry.map_err(err)?;
        let ty = entry.header().entry_type();
        let raw = entry.path_bytes().into_owned();
        let name = String::from_utf8_lossy(&raw);
        let name = name.trim_start_matches("./").trim_end_matches('/');
        if name.is_empty() || name == "." {
            continue;
        }
        if !(ty.is_file() || ty == tar::EntryType::Continuous) {
            continue;
        }
        if name.contains('/') || name == ".." {
            return Err(ctx.format(format!("{member}: unexpected member path {name:?}")));
        }
        let name = name.to_string();
        let mode = entry.header().mode().map_err(err)? & 0o7777;
        let mut data = Vec::with_capacity(entry.size() as usize);
        entry.read_to_end(&mut data).map_err(err)?;
        if name == "control" {
            control = Some(String::from_utf8_lossy(&data).into_owned());
        } else {
            members.push(ControlMember { name, mode, data });
        }
    }
    let Some(control) = control else {
        return Err(ctx.format(format!("{member} has no control file")));
    };
    Ok(ControlMembers { control, members })
}
