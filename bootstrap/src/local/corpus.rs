//! The small MIDI corpus `up --provider local` serves from the local S3 endpoint when
//! it is given no `--midi-dir`: songs whose instrument sets overlap, so that the batch
//! job finds similar pairs, written as General MIDI files the job reads like any other.

use std::path::Path;

use midly::num::{u4, u7, u15, u24, u28};
use midly::{Format, Header, MetaMessage, MidiMessage, Smf, Timing, TrackEvent, TrackEventKind};

use super::Error;

/// General MIDI programs the songs draw from (piano, guitars, bass, strings, brass, …).
const POOL: [u8; 8] = [0, 24, 25, 32, 40, 48, 56, 73];
/// The percussion channel (channel 10, counted from 1), which the job names `drums`.
const DRUMS: u8 = 9;

/// Writes `count` songs to `dir` (`song-000.mid`, …) unless it already holds them.
pub fn write(dir: &Path, count: usize) -> Result<(), Error> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    for song in 0..count {
        let path = dir.join(format!("song-{song:03}.mid"));
        if path.exists() {
            continue;
        }
        let mut bytes = Vec::new();
        smf(&instruments(song)).write(&mut bytes).map_err(|e| Error::io(&path, std::io::Error::other(e)))?;
        std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))?;
    }
    Ok(())
}

/// Checks that the local S3 endpoint, which runs as an unprivileged user and reads `dir`
/// through a hostPath volume, can reach it: every directory on the way must let others
/// in. Said up front, rather than as a crash-looping pod.
pub fn check_readable(dir: &Path) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt;
    for ancestor in dir.ancestors() {
        let mode = std::fs::metadata(ancestor).map_err(|e| Error::io(ancestor, e))?.permissions().mode();
        let needed = if ancestor == dir { 0o005 } else { 0o001 };
        if mode & needed != needed {
            return Err(Error::io(
                ancestor,
                std::io::Error::other(format!(
                    "mode {:o} keeps the local S3 endpoint (an unprivileged user) from reading the MIDI files in {}",
                    mode & 0o777,
                    dir.display()
                )),
            ));
        }
    }
    Ok(())
}

/// Song `n`'s programs, and whether it has drums: a fixed spread over [`POOL`] (a
/// multiplicative hash of `n`'s bits), three to six instruments each.
fn instruments(n: usize) -> (Vec<u8>, bool) {
    let bits = (n as u32).wrapping_add(1).wrapping_mul(2_654_435_761) >> 16;
    let mut programs: Vec<u8> =
        POOL.iter().enumerate().filter(|(i, _)| bits & (1 << i) != 0).map(|(_, p)| *p).collect();
    for program in POOL {
        if programs.len() >= 3 {
            break;
        }
        if !programs.contains(&program) {
            programs.push(program);
        }
    }
    programs.truncate(6);
    (programs, bits & (1 << 8) != 0)
}

/// A type 1 file: a tempo track, then one track per instrument on a channel of its own.
fn smf((programs, drums): &(Vec<u8>, bool)) -> Smf<'static> {
    let event = |delta: u32, kind| TrackEvent { delta: u28::new(delta), kind };
    let midi = |channel: u8, message| TrackEventKind::Midi { channel: u4::new(channel), message };
    let notes = |channel: u8, key: u8| {
        vec![
            event(0, midi(channel, MidiMessage::NoteOn { key: u7::new(key), vel: u7::new(90) })),
            event(240, midi(channel, MidiMessage::NoteOff { key: u7::new(key), vel: u7::new(0) })),
        ]
    };
    let end = event(0, TrackEventKind::Meta(MetaMessage::EndOfTrack));
    let mut tracks = vec![vec![event(0, TrackEventKind::Meta(MetaMessage::Tempo(u24::new(500_000)))), end]];
    // Channels 0..=8 and 10..: never the percussion channel.
    let channels = (0u8..16).filter(|c| *c != DRUMS);
    for (program, channel) in programs.iter().zip(channels) {
        let mut track = vec![event(0, midi(channel, MidiMessage::ProgramChange { program: u7::new(*program) }))];
        track.extend(notes(channel, 60));
        track.push(end);
        tracks.push(track);
    }
    if *drums {
        let mut track = notes(DRUMS, 36);
        track.push(end);
        tracks.push(track);
    }
    Smf { header: Header::new(Format::Parallel, Timing::Metrical(u15::new(480))), tracks }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn songs_have_three_to_six_instruments_and_overlap() {
        let sets: Vec<_> = (0..40).map(instruments).collect();
        assert!(sets.iter().all(|(programs, _)| (3..=6).contains(&programs.len())), "{sets:?}");
        assert!(sets.iter().any(|(_, drums)| *drums) && sets.iter().any(|(_, drums)| !drums), "{sets:?}");
        let distinct: std::collections::HashSet<_> = sets.iter().collect();
        assert!(distinct.len() > 20, "varied: {} distinct sets of 40", distinct.len());
    }

    #[test]
    fn a_directory_others_cannot_enter_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let midi = dir.path().join("midi");
        write(&midi, 1).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let error = check_readable(&midi).unwrap_err().to_string();
        assert!(error.contains("mode 700") && error.contains(&dir.path().display().to_string()), "{error}");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        check_readable(&midi).unwrap();
    }

    #[test]
    fn a_song_parses_back_with_its_programs_and_drums() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 3).unwrap();
        let bytes = std::fs::read(dir.path().join("song-002.mid")).unwrap();
        let smf = Smf::parse(&bytes).unwrap();
        let (programs, drums) = instruments(2);
        let mut read = Vec::new();
        let mut read_drums = false;
        for event in smf.tracks.iter().flatten() {
            match event.kind {
                TrackEventKind::Midi { message: MidiMessage::ProgramChange { program }, .. } => {
                    read.push(program.as_int())
                }
                TrackEventKind::Midi { channel, message: MidiMessage::NoteOn { .. } } if channel == DRUMS => {
                    read_drums = true
                }
                _ => {}
            }
        }
        assert_eq!((read, read_drums), (programs, drums));
    }
}
