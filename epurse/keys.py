"""The simulator's issuer TEST keys: public, published here on purpose, never for real money.

Card issuers publish test keys so that terminal makers can certify against test cards; these play that part for
farebox. Simulated cards (hardware_sim) and the simulated PSAM use them by default, and anyone can check a simulated
card's MAC or TAC with their own tools. A real deployment gets its master keys from the issuer, through the back
office's key service (an HSM or a key file), and never from this module.

Test issuer code (8 bytes): ``4650425800000001`` (ASCII "FPBX", then 00000001).

Master keys (16 bytes, two-key 3DES); each card's own key is diversified from them by its ASN (epurse.crypto.diversify):

- purchase     ``2E9A3899F00316B773055A2AB8164C98``  -> DPK: purchase session keys, MAC1 / MAC2
- load         ``3C695C2ACC4FEEC91B2E2E39426198A7``  -> DLK: load session keys (over-the-air top-up)
- tac          ``4A06C4DC1BC469534F48F867B61BE3F4``  -> DTK: TACs, which the back office verifies
- maintenance  ``244CA011A82A43836F105187E96473CC``  -> DAMK: application block / unblock

Checking a TAC by hand, with nothing but a shell and OpenSSL 3 (single DES needs the legacy provider). A purchase of
200 fen (``000000C8``), type ``06``, terminal ``010000000042``, terminal sequence 7, on 2024-03-05 at 07:30:00, by the
card whose ASN ends in the card number ``0000000000012345``::

    M=4A06C4DC1BC469534F48F867B61BE3F4                 # the tac master key above
    D=0000000000012345                                 # card number: the last 8 bytes of the ASN
    NOTD=$(printf '%016X' $(( ~0x$D )))
    L=$(echo $D    | xxd -r -p | openssl enc -des-ede-ecb -K $M -nopad | xxd -p)   # DTK left half
    R=$(echo $NOTD | xxd -r -p | openssl enc -des-ede-ecb -K $M -nopad | xxd -p)   # DTK right half
    K=$(printf '%016X' $(( 0x$L ^ 0x$R )))             # TAC key = left XOR right = 35482F8F67C20FD1
    # amount(4) type(1) terminal(6) terminal seq(4) date(4) time(3), then 80 and 00s to a multiple of 8:
    DATA=000000C8060100000000420000000720240305073000
    echo ${DATA}8000 | xxd -r -p \\
      | openssl enc -des-cbc -provider legacy -provider default -K $K -iv 0000000000000000 -nopad \\
      | tail -c 8 | head -c 4 | xxd -p                 # the TAC: 620098f7

MAC1 and MAC2 work the same way with the session key SESPK = 3DES(DPK, card random || TTC || low 2 bytes of the
terminal sequence) in place of the TAC key; see epurse.crypto for every layout.

The same four master keys serve SM4 cards (algorithm ``04``): a 16-byte key is an SM4 key as it is. An SM4 card's
keys are SM4(master, D || NOT D), its TAC key is DTK itself, and its MACs are SM4 CBC-MACs padded to 16 bytes. The
same purchase as a composite one (type ``09``) on an SM4 card, by hand::

    M=4A06C4DC1BC469534F48F867B61BE3F4; D=0000000000012345; NOTD=$(printf '%016X' $(( ~0x$D )))
    K=$(echo $D$NOTD | xxd -r -p | openssl enc -sm4-ecb -K $M -nopad | xxd -p -c 64)   # DTK = the TAC key
    DATA=000000C8090100000000420000000720240305073000   # 22 bytes, then 80 and nine 00s to 32
    echo ${DATA}80000000000000000000 | xxd -r -p \\
      | openssl enc -sm4-cbc -K $K -iv 00000000000000000000000000000000 -nopad \\
      | tail -c 16 | head -c 4 | xxd -p                 # the TAC: fef823c9

The maintenance key DAMK only ever computes the APPLICATION BLOCK MAC (epurse.crypto ``block_mac``), in the PSAM.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class IssuerKeys:
    """An issuer's 16-byte master keys, from which every card's own keys are diversified."""

    purchase: bytes
    load: bytes
    tac: bytes
    maintenance: bytes

    def __post_init__(self):
        for name in ("purchase", "load", "tac", "maintenance"):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != 16:
                raise ValueError(f"the {name} master key must be 16 bytes")

    def __repr__(self) -> str:
        # Keep real keys out of logs and tracebacks; the test keys are in the module docstring anyway.
        return "IssuerKeys(<4 master keys>)"


TEST_ISSUER_CODE = bytes.fromhex("4650425800000001")

TEST_ISSUER_KEYS = IssuerKeys(
    purchase=bytes.fromhex("2E9A3899F00316B773055A2AB8164C98"),
    load=bytes.fromhex("3C695C2ACC4FEEC91B2E2E39426198A7"),
    tac=bytes.fromhex("4A06C4DC1BC469534F48F867B61BE3F4"),
    maintenance=bytes.fromhex("244CA011A82A43836F105187E96473CC"),
)
