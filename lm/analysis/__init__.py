"""Reading runs back: results tables, loss curves and the scaling-law fit; the muP coordinate check."""
