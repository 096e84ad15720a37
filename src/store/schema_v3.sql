-- Extended output options (crop, backgrounds, channels, roi, ...) as JSON, for queued jobs whose
-- format, size and colour columns do not say it all; NULL means those columns do.
ALTER TABLE jobs ADD COLUMN options TEXT;
-- The subject's box in the result: "left,top,width,height" (NULL: none found, or not recorded).
ALTER TABLE jobs ADD COLUMN foreground TEXT;
UPDATE meta SET value = '3' WHERE key = 'schema';
