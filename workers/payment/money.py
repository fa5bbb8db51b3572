"""Money as the payment executors take it: integer minor units and an ISO 4217 code.

Amounts are never floats: ``1050`` EUR is 10.50 €, ``1050`` JPY is ¥1,050 (the currency's
own minor unit; this module does not convert). A task states the amount in the currency's
minor units, as Stripe and most ledgers do.
"""

from __future__ import annotations

#: the largest amount a task may ask for, in minor units (10 billion in a 2-decimal currency)
MAX_AMOUNT = 10**12

#: ISO 4217 active alphabetic codes (list one, as published in 2025), less ``XXX`` (no
#: currency) and ``XTS`` (reserved for testing). Funds codes (``BOV``, ``CLF``, ``USN``, ...)
#: and the precious metals are kept: ledgers do carry them.
ISO_4217 = frozenset(
    """
    AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BOV BRL BSD
    BTN BWP BYN BZD CAD CDF CHE CHF CHW CLF CLP CNY COP COU CRC CUC CUP CVE CZK DJF DKK DOP
    DZD EGP ERN ETB EUR FJD FKP GBP GEL GHS GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR
    IQD IRR ISK JMD JOD JPY KES KGS KHR KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD
    MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MXV MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB
    PEN PGK PHP PKR PLN PYG QAR RON RSD RUB RWF SAR SBD SCR SDG SEK SGD SHP SLE SLL SOS SRD
    SSP STN SVC SYP SZL THB TJS TMT TND TOP TRY TTD TWD TZS UAH UGX USD USN UYI UYU UYW UZS
    VED VES VND VUV WST XAF XAG XAU XBA XBB XBC XBD XCD XCG XDR XOF XPD XPF XPT XSU XUA YER
    ZAR ZMW ZWG ZWL
    """.split()  # noqa: SIM905 (a table people read is easier to check than 180 strings)
)


def check_currency(code: str) -> str:
    """``code`` if it is an active ISO 4217 code (upper case), else ValueError."""
    if code not in ISO_4217:
        raise ValueError("not an active ISO 4217 currency code (three upper-case letters)")
    return code
