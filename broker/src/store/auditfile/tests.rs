//! Tests of the file audit log beyond the `Store` conformance suite.
