"""The SMS channel (issue 11): the gateway adapter (``gateway``: send a text, verify a rider's text arriving as a
signed webhook) and the seed's command dialogue (``dialogue``: C#origin#destination#date#time -> quote -> Y ->
payment -> pickup code), with its tables of revision 2026_12_03_0023 (``tables``)."""
