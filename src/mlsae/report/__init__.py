"""Stage 7, what a reader opens: matplotlib figures and the self-contained report.html of
analysis and evolution results. May import every stage below it, never cli."""
