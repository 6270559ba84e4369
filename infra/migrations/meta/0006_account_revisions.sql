-- Accounts take a revision of the store's one revision counter whenever they are created
-- or their role, person link or disabled state changes, so every API node can follow
-- account changes in commit order (as it follows keys and revoked sessions) and apply a
-- demotion, a relink or a disable to tokens already issued.

ALTER TABLE accounts ADD COLUMN revision BIGINT NOT NULL DEFAULT 0;
CREATE INDEX accounts_revision ON accounts (revision);
