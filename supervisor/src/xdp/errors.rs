//! Reading OS error codes out of aya's error chains.

/// The first OS error in an error's chain.
pub(super) fn os_error(error: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(code) = io.raw_os_error()
        {
            return Some(code);
        }
        source = e.source();
    }
    None
}

pub(super) fn is_os_error(error: &(dyn std::error::Error + 'static), codes: &[i32]) -> bool {
    os_error(error).is_some_and(|code| codes.contains(&code))
}

/// An error and its sources on one line.
pub(super) fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}
