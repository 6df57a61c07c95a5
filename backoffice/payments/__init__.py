"""The payment platform, both ways (issue 11): the adapter (``platform``), the order-query job, refunds exactly
once and the daily statement (``service``), notifications for ticket and top-up orders (``notify``), and the tables
of revision 2026_12_03_0022 (``tables``)."""
