"""Running a federation as long-lived processes: certificates and keys, and the supervision of daemons."""
