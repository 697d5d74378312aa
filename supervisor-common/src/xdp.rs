//! The XDP filter's maps contract (filled in by the XDP work).
