"""tether: keep an aligned model aligned while teaching it something new."""
