"""From records to a paper's numbers: tables (report, render), statistics (stats), verdicts on
claims (claims, document), plots (plots), and your runs against an archive (against)."""
