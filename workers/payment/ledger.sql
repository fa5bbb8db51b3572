-- The payment ledger (wayang_workers.payment, provider "ledger"): double-entry bookkeeping.
-- Applied by the worker at start (setting create_schema = true, the default), idempotently,
-- under an advisory lock so that several workers starting at once do not race; or by hand:
--   psql "$DSN" -f workers/payment/ledger.sql
--
-- Every movement of money is one transfer and two postings (the amount out of one account,
-- the same amount into another), written in one transaction with the accounts' new balances:
-- the postings of a transfer sum to zero, so the balances of all accounts always do.
CREATE SCHEMA IF NOT EXISTS wayang_ledger;

-- Accounts are opened by the operator (or a test), never by a task:
--   INSERT INTO wayang_ledger.accounts (id, currency, allow_negative) VALUES ('merchant', 'EUR', false);
-- allow_negative: an account that stands for money outside the ledger (a card network, a bank)
-- may go below zero; any other account refuses a debit it cannot cover (insufficient_funds).
CREATE TABLE IF NOT EXISTS wayang_ledger.accounts (
    id             text PRIMARY KEY CHECK (length(id) BETWEEN 1 AND 128),
    currency       char(3) NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    allow_negative boolean NOT NULL DEFAULT false,
    balance        bigint NOT NULL DEFAULT 0,
    created_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT balance_allowed CHECK (allow_negative OR balance >= 0)
);

-- One row per charge, refund or void. (key_space, idempotency_key) is unique: the charge of a
-- key and its void share the 'charge' space, so a key is either charged or voided, once; refunds
-- have keys of their own.
CREATE TABLE IF NOT EXISTS wayang_ledger.transfers (
    id              text PRIMARY KEY,
    key_space       text NOT NULL CHECK (key_space IN ('charge', 'refund')),
    idempotency_key text NOT NULL,
    kind            text NOT NULL CHECK (kind IN ('charge', 'refund', 'void')),
    amount          bigint NOT NULL,
    currency        char(3),
    from_account    text REFERENCES wayang_ledger.accounts (id),
    to_account      text REFERENCES wayang_ledger.accounts (id),
    charge_id       text REFERENCES wayang_ledger.transfers (id),
    description     text,
    metadata        jsonb NOT NULL DEFAULT '{}'::jsonb,
    task_id         text NOT NULL DEFAULT '',
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (key_space, idempotency_key),
    CHECK ((kind = 'charge' AND key_space = 'charge' AND amount > 0 AND charge_id IS NULL)
        OR (kind = 'refund' AND key_space = 'refund' AND amount > 0 AND charge_id IS NOT NULL)
        OR (kind = 'void' AND key_space = 'charge' AND amount = 0)),
    CHECK (kind = 'void' OR (from_account IS NOT NULL AND to_account IS NOT NULL
                             AND from_account <> to_account AND currency IS NOT NULL))
);

CREATE INDEX IF NOT EXISTS transfers_charge_id ON wayang_ledger.transfers (charge_id)
    WHERE charge_id IS NOT NULL;

-- Two per charge or refund (none for a void): the debit (negative) and the credit (positive).
CREATE TABLE IF NOT EXISTS wayang_ledger.postings (
    transfer_id text NOT NULL REFERENCES wayang_ledger.transfers (id),
    account     text NOT NULL REFERENCES wayang_ledger.accounts (id),
    amount      bigint NOT NULL CHECK (amount <> 0),
    PRIMARY KEY (transfer_id, account)
);
