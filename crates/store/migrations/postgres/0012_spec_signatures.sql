-- The Ed25519 signature (hex) of a job's spec, made by the server when the
-- job was created, before the row was written (drover_proto::signing). Every
-- assignment of the job carries it, and the agent refuses one it does not
-- verify: editing the row's argv, env names, sandbox, … afterwards cannot
-- produce a matching one without the server's private key. NULL: created
-- before assignments were signed (an agent that knows the key refuses it).
ALTER TABLE jobs ADD COLUMN spec_sig TEXT;
